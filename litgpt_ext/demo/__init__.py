"""Everything of the demo: the offline corpus (`corpus`, from `sources` and `math_gen`), its SFT tasks
(`sft_tasks`) and the `demo` command (`run`). The local lm-eval tasks' builder stays in
`litgpt_ext.eval.build_tasks`: `evaluate` builds missing tasks on the fly."""
