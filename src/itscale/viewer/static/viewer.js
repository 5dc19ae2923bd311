/* The itscale trace viewer: plain JavaScript, no library, nothing fetched.
 *
 * It reads the JSON in #trace-data ({"trace": an itscale trace, "view": what Python added})
 * and draws the genealogy in SVG: one lane per (chain, sweep), one column per recorded step,
 * one circle per particle (area proportional to its weight normalised within the column),
 * a curve from each particle to its parent in the column before. Within a column the
 * particles are ordered by their parents' rows, so lineages do not cross needlessly.
 * Particles with no descendant in their lane's last column are faded: what survives of the
 * first column tells a collapsed search from a diverse one.
 * Clicking a particle shows its whole text step by step (following parents) in the side
 * panel; the final answers, the usage and the settings are beside it.
 */
"use strict";
(function () {
  const started = performance.now();
  const SVGNS = "http://www.w3.org/2000/svg";
  const CUT_ENDS = new Set(["length", "max_steps"]); // finished by a cap, not by an answer
  const LEFT = 150;
  const LANE_HEAD = 36;
  const LANE_PAD = 14;
  const R_MIN = 2.2;
  const R_MAX = 15;

  const payload = JSON.parse(document.getElementById("trace-data").textContent);
  const trace = payload.trace;
  const view = payload.view || {};
  const context = view.context || {};
  const final = trace.final || null;
  const settings = trace.settings || {};

  // ------------------------------------------------------------------ helpers

  function h(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "onclick") node.addEventListener("click", v);
      else node.setAttribute(k, v);
    }
    for (const child of children || []) if (child != null) node.append(child);
    return node;
  }

  function s(tag, attrs) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "–";
    if (typeof x !== "number") return String(x);
    if (!Number.isFinite(x)) return x > 0 ? "∞" : "−∞";
    if (Number.isInteger(x) && digits === undefined) return x.toLocaleString("en-US");
    const d = digits === undefined ? 3 : digits;
    if (x !== 0 && Math.abs(x) < Math.pow(10, -d)) return x.toExponential(1);
    return x.toFixed(d);
  }

  function seconds(x) {
    return typeof x === "number" ? x.toFixed(x < 0.1 ? 3 : 1) : "–";
  }

  function logWeight(value) {
    return value === null || value === undefined ? -Infinity : value; // null: -inf or NaN in the file
  }

  function facts(rows) {
    const dl = h("dl", { class: "facts" });
    for (const [name, value] of rows) {
      if (value === undefined) continue;
      dl.append(h("dt", { text: name }), h("dd", { text: value }));
    }
    return dl;
  }

  // ------------------------------------------------------------------ model

  function buildModel() {
    const lanes = [];
    const byKey = new Map();
    (trace.columns || []).forEach(function (column, index) {
      const key = column.chain + "/" + column.sweep;
      let lane = byKey.get(key);
      if (!lane) {
        lane = { chain: column.chain, sweep: column.sweep, columns: [] };
        byKey.set(key, lane);
        lanes.push(lane);
      }
      lane.columns.push({ source: column, index: index, lane: lane });
    });
    lanes.sort((a, b) => a.chain - b.chain || a.sweep - b.sweep);

    // The lane that answers: the one whose last column holds exactly the final particles.
    const finalIds = new Set(final && final.ids ? final.ids : []);
    let answering = null;
    for (const lane of lanes) {
      const last = lane.columns[lane.columns.length - 1];
      const ids = last.source.nodes.map((n) => n.id);
      if (finalIds.size && ids.length === finalIds.size && ids.every((id) => finalIds.has(id))) {
        if (!answering || last.index > answering.index) answering = last;
      }
    }

    let nodes = 0;
    let edges = 0;
    lanes.forEach(function (lane, laneIndex) {
      lane.index = laneIndex;
      lane.columns.forEach(function (column, k) {
        const previous = k > 0 ? lane.columns[k - 1] : null;
        const raw = column.source.nodes;
        const lws = raw.map((n) => logWeight(n.log_weight));
        const top = Math.max(-Infinity, ...lws);
        const ws = lws.map((lw) => (top === -Infinity ? 0 : Math.exp(lw - top)));
        const total = ws.reduce((a, b) => a + b, 0);
        column.k = k;
        column.isFinal = column === answering;
        column.nodes = raw.map(function (data, order) {
          const parent = previous && data.parent !== null ? previous.byId.get(data.parent) || null : null;
          return {
            data: data,
            column: column,
            order: order,
            weight: total > 0 ? ws[order] / total : 0,
            parent: parent,
            children: [],
          };
        });
        column.byId = new Map(column.nodes.map((n) => [n.data.id, n]));
        if (previous) {
          const rowOf = (n) => (n.parent ? n.parent.row : Infinity);
          column.nodes.sort((a, b) => rowOf(a) - rowOf(b) || a.order - b.order);
        }
        column.nodes.forEach(function (n, row) {
          n.row = row;
          if (n.parent) {
            n.parent.children.push(n);
            edges += 1;
          }
        });
        nodes += column.nodes.length;
      });
      lane.rows = Math.max(1, ...lane.columns.map((c) => c.nodes.length));
      // The surviving ancestry: every particle with a descendant in the lane's last column.
      // Resampling prunes the rest; how many first-step particles survive shows a collapse.
      for (const n of lane.columns[lane.columns.length - 1].nodes) {
        for (let a = n; a && !a.survives; a = a.parent) a.survives = true;
      }
      lane.roots = lane.columns[0].nodes.length;
      lane.survivingRoots = lane.columns[0].nodes.filter((n) => n.survives).length;
    });
    let chosen = null;
    if (answering && final && final.chosen !== null && final.chosen !== undefined) {
      chosen = answering.byId.get(final.chosen) || null;
    }
    return { lanes: lanes, answering: answering, chosen: chosen, nodes: nodes, edges: edges };
  }

  // ------------------------------------------------------------------ drawing

  function rowGapFor(rows) {
    if (rows <= 4) return 40;
    if (rows <= 8) return 26;
    if (rows <= 16) return 19;
    if (rows <= 32) return 13;
    return 10;
  }

  function laneTitle(lane, model) {
    const several = model.lanes.length > 1;
    if (!several) return "population";
    const parts = [];
    if (model.lanes.some((l) => l.chain !== model.lanes[0].chain)) parts.push("chain " + lane.chain);
    if (model.lanes.some((l) => l.sweep !== model.lanes[0].sweep)) parts.push("sweep " + lane.sweep);
    return parts.join(" · ") || "lane " + (lane.index + 1);
  }

  function laneNote(lane, model) {
    const notes = [];
    const temperatures = settings.temperatures;
    if (Array.isArray(temperatures) && lane.chain >= 1 && lane.chain <= temperatures.length) {
      notes.push("T = " + fmt(temperatures[lane.chain - 1], 2));
    }
    if (lane.chain === 0 && model.lanes.some((l) => l.chain > 0)) notes.push("final population");
    if (model.answering && model.answering.lane === lane) notes.push("answers");
    return notes.join(" · ");
  }

  function draw(model) {
    const maxRows = Math.max(1, ...model.lanes.map((l) => l.rows));
    const rowGap = rowGapFor(maxRows);
    const maxColumns = Math.max(1, ...model.lanes.map((l) => l.columns.length));
    // Columns spread over the width there is, between 40 and 120 pixels apart.
    const room = document.getElementById("graph").clientWidth - LEFT - 24;
    const gap = Math.max(40, Math.min(120, room / maxColumns));
    const width = LEFT + maxColumns * gap + 24;
    let y = 0;
    for (const lane of model.lanes) {
      lane.top = y;
      lane.height = LANE_HEAD + 2 * LANE_PAD + (lane.rows - 1) * rowGap;
      y += lane.height + 10;
    }
    const height = Math.max(40, y);

    const root = s("svg", { viewBox: "0 0 " + width + " " + height, role: "img" });
    root.setAttribute("aria-label", "genealogy of the particles");
    const back = s("g", { class: "lanes" });
    const marks = s("g", { class: "marks" });
    const edgeLayer = s("g", { class: "edges" });
    const nodeLayer = s("g", { class: "nodes" });
    root.append(back, marks, edgeLayer, nodeLayer);

    const all = [];
    for (const lane of model.lanes) {
      back.append(s("rect", { class: "lane-band", x: 0, y: lane.top, width: width, height: lane.height, rx: 4 }));
      const label = s("text", { class: "lane-label", x: 10, y: lane.top + 18 });
      label.textContent = laneTitle(lane, model);
      back.append(label);
      const note = s("text", { class: "lane-note", x: 10, y: lane.top + 33 });
      note.textContent = laneNote(lane, model);
      back.append(note);
      const count = s("text", { class: "lane-note", x: 10, y: lane.top + 47 });
      count.textContent = lane.columns.length + (lane.columns.length === 1 ? " column" : " columns");
      back.append(count);
      const roots = s("text", { class: "lane-note survivors", x: 10, y: lane.top + 61 });
      roots.textContent = lane.survivingRoots + " of " + lane.roots + " roots survive";
      const why = s("title");
      why.textContent =
        lane.survivingRoots + " of the " + lane.roots + " particles of the first column have descendants in the last " +
        "one; the faded particles left none (resampling dropped their line).";
      const tipped = s("g"); // the tooltip beside the text, not in it
      tipped.append(why, roots);
      back.append(tipped);
      for (const column of lane.columns) {
        const x = LEFT + column.k * gap + gap / 2;
        const src = column.source;
        const step = s("text", { class: "step-label", x: x, y: lane.top + 13 });
        step.textContent = String(src.step);
        marks.append(step);
        if (src.resampled) {
          const band = s("rect", {
            class: "resample-band",
            x: x - gap / 2 + 3,
            y: lane.top + 16,
            width: gap - 6,
            height: lane.height - 20,
            rx: 3,
          });
          const tip = s("title");
          tip.textContent =
            "after step " + src.step + ": " + (src.ess !== null ? "ESS " + fmt(src.ess, 2) + ", " : "") +
            "resampled (" + (src.selection ? src.selection.children.length : "?") + " children)";
          band.append(tip);
          marks.append(band);
        }
        if (src.resampled || (src.ess !== null && src.ess !== undefined)) {
          const ess = s("text", { class: "ess-label" + (src.resampled ? " resampled" : ""), x: x, y: lane.top + 27 });
          ess.textContent = (src.resampled ? "↻" : "") + (src.ess !== null && src.ess !== undefined ? fmt(src.ess, 1) : "");
          marks.append(ess);
        }
        const offset = ((lane.rows - column.nodes.length) * rowGap) / 2;
        for (const n of column.nodes) {
          n.x = x;
          n.y = lane.top + LANE_HEAD + LANE_PAD + offset + n.row * rowGap;
          n.r = R_MIN + (R_MAX - R_MIN) * Math.sqrt(n.weight);
          all.push(n);
        }
      }
    }

    const finalIds = new Set(final && final.ids ? final.ids : []);
    for (const n of all) {
      if (n.parent) {
        const p = n.parent;
        const mid = (p.x + n.x) / 2;
        n.edge = s("path", {
          class: n.survives ? "edge" : "edge extinct",
          d: "M" + p.x + "," + p.y + "C" + mid + "," + p.y + " " + mid + "," + n.y + " " + n.x + "," + n.y,
        });
        edgeLayer.append(n.edge);
      }
    }
    // Large circles first, so that a small particle beside a heavy one stays clickable.
    all.sort((a, b) => b.r - a.r);
    for (const n of all) {
      const d = n.data;
      const classes = ["dot", "node"];
      if (d.finished) classes.push("finished");
      if (d.finished && CUT_ENDS.has(d.end)) classes.push("cut");
      if (!d.extended) classes.push("carried");
      if (n.weight === 0) classes.push("zero");
      if (n.column.isFinal && finalIds.has(d.id)) classes.push("final");
      if (n === model.chosen) classes.push("chosen");
      if (!n.survives) classes.push("extinct");
      n.el = s("circle", {
        class: classes.join(" "),
        cx: n.x,
        cy: n.y,
        r: n.r.toFixed(2),
        "data-id": d.id,
        "data-lane": n.column.lane.index,
        "data-column": n.column.k,
      });
      const tip = s("title");
      tip.textContent =
        "#" + d.id + " · step " + n.column.source.step + " · weight " + fmt(n.weight) + " · reward " +
        fmt(d.reward) + (d.finished ? " · finished (" + d.end + ")" : "");
      n.el.append(tip);
      n.el.addEventListener("click", function (event) {
        event.stopPropagation();
        select(n);
      });
      nodeLayer.append(n.el);
    }
    for (let n = model.chosen; n; n = n.parent) {
      n.el.classList.add("chosen-path");
      if (n.edge) n.edge.classList.add("chosen-path");
    }
    return { root: root, width: width, height: height };
  }

  // ------------------------------------------------------------------ panels

  let selected = null;

  function select(n) {
    if (selected) {
      selected.el.classList.remove("selected");
      for (let a = selected; a; a = a.parent) {
        a.el.classList.remove("lineage");
        if (a.edge) a.edge.classList.remove("lineage");
      }
    }
    selected = n;
    const panel = document.getElementById("particle");
    panel.replaceChildren();
    if (!n) {
      panel.append(h("p", { class: "hint", text: "Click a particle to read its text, step by step." }));
      return;
    }
    for (let a = n; a; a = a.parent) {
      a.el.classList.add("lineage");
      if (a.edge) a.edge.classList.add("lineage");
    }
    n.el.classList.remove("lineage");
    n.el.classList.add("selected");
    panel.append(particleDetails(n));
  }

  function particleDetails(n) {
    const d = n.data;
    const lane = n.column.lane;
    const box = h("div", { id: "particle-text" });
    const where = model.lanes.length > 1 ? " · " + laneTitle(lane, model) : "";
    box.append(h("p", {}, [h("strong", { text: "particle #" + d.id }), " at step " + n.column.source.step + where]));
    const finalIds = final && final.ids ? final.ids : [];
    const isFinal = n.column.isFinal && finalIds.includes(d.id);
    const finalIndex = finalIds.indexOf(d.id);
    const answer = view.particles ? view.particles[String(d.id)] : null;
    box.append(
      facts([
        ["weight in its column", fmt(n.weight)],
        ["log-weight", fmt(d.log_weight === null ? -Infinity : d.log_weight)],
        ["reward", fmt(d.reward)],
        ["step reward", fmt(d.step_reward)],
        ["ended", d.end ? d.end + (d.finished ? " (finished)" : "") : "–"],
        ["final answer", isFinal ? (answer === null || answer === undefined ? "(none)" : String(answer)) : undefined],
        ["final weight", isFinal && final.weights ? fmt(final.weights[finalIndex]) : undefined],
        ["chosen", n === model.chosen ? "yes: this is the answer the search returned" : undefined],
      ]),
    );
    const lineage = [];
    for (let a = n; a; a = a.parent) lineage.push(a);
    lineage.reverse();
    const steps = lineage.filter((a) => a.data.extended && a.data.text !== "");
    const last = steps[steps.length - 1];
    for (const a of steps) {
      const head =
        "step " + a.column.source.step + " · step reward " + fmt(a.data.step_reward) + " · reward " + fmt(a.data.reward) +
        (a.data.id !== (a.parent ? a.parent.data.id : a.data.id) ? " · copy of #" + a.parent.data.id : "");
      box.append(
        h("div", { class: "step" + (a === last ? " last" : "") }, [
          h("div", { class: "step-head", text: head }),
          h("div", { class: "step-text", text: a.data.text }),
        ]),
      );
    }
    if (!steps.length) box.append(h("p", { class: "note", text: "No text yet." }));
    if (!d.extended && d.finished) {
      box.append(h("p", { class: "note", text: "Finished earlier: carried along unchanged at this step." }));
    }
    const root = lineage[0].data;
    if (root.parent !== null && root.parent !== undefined) {
      const missing = "Its parent #" + root.parent + " is not in the column before: the trace does not hold its earlier steps.";
      box.append(h("p", { class: "note", text: missing }));
    }
    return box;
  }

  function headline() {
    const line = document.getElementById("headline");
    const mode = typeof settings.mode === "string" ? " (" + settings.mode + " mode)" : "";
    line.append(h("span", { class: "algorithm", text: (trace.algorithm || "search") + mode }));
    if (final) {
      line.append(" · answer ", h("strong", { text: final.answer === null ? "none" : String(final.answer) }));
    } else {
      line.append(" · no final answer recorded");
    }
    if (context.reference !== undefined && context.reference !== null) {
      const right = context.correct === true;
      line.append(
        " · reference " + context.reference + " ",
        h("span", { class: right ? "verdict-right" : "verdict-wrong", text: right ? "✓ right" : "✗ wrong" }),
      );
    }
    const bits = [];
    if (context.problem !== undefined && context.problem !== null) bits.push("problem " + context.problem);
    if (settings.budget !== undefined) bits.push("budget " + settings.budget);
    if (settings.seed !== undefined) bits.push("seed " + settings.seed);
    bits.push(model.nodes + " particles-steps in " + (trace.columns || []).length + " columns");
    line.append(h("span", { class: "hint", text: " · " + bits.join(" · ") }));
    const messages = trace.prompt || [];
    const user = [...messages].reverse().find((m) => m.role === "user") || messages[messages.length - 1];
    const problem = document.getElementById("problem");
    problem.textContent = user ? user.content : "";
    problem.title = user ? user.content : "";
  }

  function finalPanel() {
    const box = document.getElementById("final");
    if (!final) {
      box.append(h("p", { class: "hint", text: "No final pick recorded (the search did not finish)." }));
      return;
    }
    const answers = view.answers || [];
    const voted = view.voted;
    const head = h("tr", {}, [
      h("th", { text: "answer" }),
      h("th", { class: "num", text: "weight" }),
      h("th", {}),
      h("th", { class: "num", text: "particles" }),
      voted ? h("th", { class: "num", text: "votes" }) : null,
    ]);
    const table = h("table", { id: "answers" }, [h("thead", {}, [head])]);
    const body = h("tbody");
    const top = Math.max(1e-12, ...answers.map((a) => a.weight), view.no_answer ? view.no_answer.weight : 0);
    const row = function (name, weight, count, vote, winner) {
      return h("tr", { class: winner ? "winner" : "" }, [
        h("td", { text: name }),
        h("td", { class: "num", text: fmt(weight) }),
        h("td", {}, [h("span", { class: "bar", style: "width:" + Math.round((60 * weight) / top) + "px" })]),
        h("td", { class: "num", text: String(count) }),
        voted ? h("td", { class: "num", text: fmt(vote === null || vote === undefined ? null : vote) }) : null,
      ]);
    };
    for (const a of answers) body.append(row(a.answer, a.weight, a.particles, a.vote, a.answer === final.answer));
    if (view.no_answer && view.no_answer.particles) {
      body.append(row("(no answer)", view.no_answer.weight, view.no_answer.particles, null, false));
    }
    table.append(body);
    box.append(table);
    box.append(
      h("p", {
        class: "hint",
        text: voted
          ? "Weights: final particle weights summed per answer; votes: the search's own tally."
          : "Weights: final particle weights summed per answer (equivalent answers pooled).",
      }),
    );
    if (model.chosen) {
      box.append(
        h("button", { type: "button", id: "show-chosen", text: "show the chosen particle", onclick: () => select(model.chosen) }),
      );
    }
  }

  function usagePanel() {
    const u = trace.usage || {};
    document.getElementById("usage").append(
      facts([
        ["prompt tokens", fmt(u.prompt_tokens)],
        ["completion tokens", fmt(u.completion_tokens)],
        ["reward tokens", fmt(u.reward_tokens)],
        ["total tokens", fmt(u.total_tokens)],
        ["generation calls", fmt(u.lm_calls)],
        ["reward calls", fmt(u.reward_calls)],
        ["scored steps", fmt(u.scored_steps)],
        ["seconds", u.seconds === undefined ? "–" : seconds(u.seconds) + " (generating " + seconds(u.lm_seconds) +
          ", scoring " + seconds(u.reward_seconds) + ")"],
      ]),
    );
  }

  function settingsPanel() {
    const box = document.getElementById("settings");
    const rows = [["algorithm", trace.algorithm || "–"]];
    for (const [k, v] of Object.entries(settings)) {
      if (k === "algorithm") continue;
      rows.push([k, JSON.stringify(v)]);
    }
    if (context.source) rows.push(["evaluation", context.source]);
    box.append(facts(rows));
    const prompt = h("details", {}, [h("summary", { text: "prompt (" + (trace.prompt || []).length + " messages)" })]);
    for (const m of trace.prompt || []) {
      prompt.append(h("div", { class: "step-head", text: m.role }), h("div", { class: "message", text: m.content }));
    }
    box.append(prompt);
  }

  function legend() {
    const box = document.getElementById("legend");
    const item = function (cls, text) {
      const icon = s("svg", { width: 12, height: 12, viewBox: "0 0 12 12" });
      icon.append(s("circle", { class: "dot " + cls, cx: 6, cy: 6, r: 4.5 }));
      const span = h("span", {}, [icon, text]);
      return span;
    };
    box.append(
      item("", "live"),
      item("finished", "finished"),
      item("finished cut", "cut by a cap"),
      item("finished carried", "carried along"),
      item("final chosen", "chosen"),
      h("span", { text: "↻ ESS: resampled after this step · size: weight in its column · faded: no descendant at the end" }),
    );
  }

  // ------------------------------------------------------------------ zoom and pan

  function zoomable(picture) {
    const graph = document.getElementById("graph");
    const label = document.getElementById("zoom-level");
    let zoom = 1;
    const apply = function (z, cx, cy) {
      z = Math.min(8, Math.max(0.05, z));
      const ax = cx === undefined ? graph.clientWidth / 2 : cx;
      const ay = cy === undefined ? graph.clientHeight / 2 : cy;
      const px = (graph.scrollLeft + ax) / zoom;
      const py = (graph.scrollTop + ay) / zoom;
      zoom = z;
      picture.root.setAttribute("width", (picture.width * z).toFixed(1));
      picture.root.setAttribute("height", (picture.height * z).toFixed(1));
      graph.scrollLeft = px * z - ax;
      graph.scrollTop = py * z - ay;
      label.textContent = Math.round(z * 100) + "%";
    };
    const fitWidth = () => (graph.clientWidth - 4) / picture.width;
    const fitHeight = () => (graph.clientHeight - 4) / picture.height;
    const fit = () => apply(Math.min(fitWidth(), fitHeight()), 0, 0);
    document.getElementById("zoom-in").addEventListener("click", () => apply(zoom * 1.25));
    document.getElementById("zoom-out").addEventListener("click", () => apply(zoom / 1.25));
    document.getElementById("zoom-fit").addEventListener("click", fit);
    document.getElementById("zoom-one").addEventListener("click", () => apply(1));
    graph.addEventListener(
      "wheel",
      function (event) {
        if (!event.ctrlKey && !event.metaKey) return; // a plain wheel scrolls
        event.preventDefault();
        const box = graph.getBoundingClientRect();
        apply(zoom * Math.exp(-event.deltaY * 0.002), event.clientX - box.left, event.clientY - box.top);
      },
      { passive: false },
    );
    let drag = null;
    graph.addEventListener("pointerdown", function (event) {
      if (event.button !== 0 || event.target.classList.contains("node")) return;
      drag = { x: event.clientX, y: event.clientY, left: graph.scrollLeft, top: graph.scrollTop, moved: false };
      graph.classList.add("panning");
    });
    window.addEventListener("pointermove", function (event) {
      if (!drag) return;
      const dx = event.clientX - drag.x;
      const dy = event.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      graph.scrollLeft = drag.left - dx;
      graph.scrollTop = drag.top - dy;
    });
    window.addEventListener("pointerup", function () {
      if (drag && !drag.moved) select(null); // a click on the background clears the selection
      drag = null;
      graph.classList.remove("panning");
    });
    document.addEventListener("keydown", function (event) {
      if (event.target.closest && event.target.closest("input, textarea")) return;
      if (event.key === "Escape") select(null);
      else if (event.key === "+" || event.key === "=") apply(zoom * 1.25);
      else if (event.key === "-") apply(zoom / 1.25);
      else if (event.key === "0") fit();
    });
    graph.append(picture.root);
    // A small search is enlarged to fill the view; a large one fits its width (scroll down).
    apply(Math.min(1.25, fitWidth(), Math.max(fitHeight(), 0.6)), 0, 0);
  }

  // ------------------------------------------------------------------ main

  const model = buildModel();
  headline();
  const picture = draw(model);
  zoomable(picture);
  select(null);
  finalPanel();
  usagePanel();
  settingsPanel();
  legend();
  if (!model.nodes) {
    document.getElementById("graph").append(h("p", { class: "hint", text: "This trace recorded no step." }));
  }
  window.itscaleViewer = {
    nodes: model.nodes,
    edges: model.edges,
    lanes: model.lanes.length,
    renderMilliseconds: performance.now() - started,
  };
})();
