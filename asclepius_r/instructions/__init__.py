"""Stage 2 (rules/instructions.smk): one LLM-generated question and answer per note, then
`mimiciii_discharge.csv`. `generate` is the engine and the dataset writer; `tasks` the seed questions
and the task draw. The LLM client it talks through is `asclepius_r.llm`.
"""
