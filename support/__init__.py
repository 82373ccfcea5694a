"""Support code outside the workflow's stages: the embedded demo's synthetic NOTEEVENTS and archive
builder, the local OpenAI-compatible server used by the tests, the rehearsal and the benchmarks, and
the rehearsal's real LLaMA vocabularies rebuilt from llama.cpp's GGUF files."""
