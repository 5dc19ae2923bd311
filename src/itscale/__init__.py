"""itscale: inference-time scaling for language models.

Particle filtering over reasoning steps (Puri et al., 2025) and the algorithms it is
compared with, on an embedded llama.cpp engine or any OpenAI-compatible server.
"""

from itscale.answers import extract_answer, is_equivalent
from itscale.api import asolve, open_model, solve
from itscale.errors import BackendError, ItscaleError, ModelNotAvailable, RewardError, UsageError
from itscale.lm.base import LanguageModel, StepOutput, StepSettings
from itscale.lm.llamacpp import LlamaCppModel
from itscale.lm.openai import OpenAIModel
from itscale.rewards.base import ProductReward, Reward, ScoreRequest, Scores
from itscale.rewards.judge import LLMJudge
from itscale.rewards.registry import DEFAULT_REWARD, make_reward
from itscale.search import ALGORITHMS, make_algorithm
from itscale.search.base import Search
from itscale.search.particle_filter import ParticleFilter
from itscale.search.sampling import BestOfN, Greedy, SelfConsistency, WeightedBestOfN
from itscale.search.settings import SearchSettings
from itscale.types import Message, Particle, Prompt, Result, Step, Usage

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "DEFAULT_REWARD",
    "BackendError",
    "BestOfN",
    "Greedy",
    "ItscaleError",
    "LLMJudge",
    "LanguageModel",
    "LlamaCppModel",
    "Message",
    "ModelNotAvailable",
    "OpenAIModel",
    "Particle",
    "ParticleFilter",
    "ProductReward",
    "Prompt",
    "Result",
    "Reward",
    "RewardError",
    "ScoreRequest",
    "Scores",
    "Search",
    "SearchSettings",
    "SelfConsistency",
    "Step",
    "StepOutput",
    "StepSettings",
    "Usage",
    "UsageError",
    "WeightedBestOfN",
    "asolve",
    "extract_answer",
    "is_equivalent",
    "make_algorithm",
    "make_reward",
    "open_model",
    "solve",
]
