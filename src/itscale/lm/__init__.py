"""Language-model backends: the embedded llama.cpp engine and OpenAI-compatible servers."""
