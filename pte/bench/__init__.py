"""Performance suite: ``python -m pte.bench <name> [options] --json out.json``.

Benchmarks (each compares the project against what a user would otherwise run, in the same process and run):
    decode           tokens/s of ``full``/``window``/``pte`` against ``generate()`` (default and static cache)
    rollout-throughput  a rank's rollout phase: update-sized micro-batches one after another against all rows at once
    rollout-memory   K/V bytes held and peak memory at growing lengths, one child process per setting
    train-memory     peak memory of one GRPO update: chunked replay against peft LoRA full-sequence backprop
    step-time        one GRPO step split into rollout, reward, replay/backward and optimiser
    flops            attention FLOPs per rollout from the cache sizes actually attended
"""
