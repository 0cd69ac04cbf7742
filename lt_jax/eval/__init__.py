"""The evaluation harness over the core: `lt-jax eval` (evaluate: niah, passkey, decode-mode perplexity,
LongBench), `lt-jax bench` (bench: speed, memory, compile times, throughput), LongBench's prompts and metrics
(longbench) and figures (plots). It uses the core through `lt_jax.Model` and the public functions of
`lt_jax.inference` / `lt_jax.cache`, and the needle prompts of `lt_jax.needles`; the core never imports it."""
