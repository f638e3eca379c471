"""Token metering: kernel results turned into TTFT / TPOT / tokens per second of a reference model.

- models:   the model shapes (ref-7b-2k, ref-8b-gqa, tiny, or a JSON file) and the kernel problems they run
- metering: the token report from a result file (`pykernels tokens`, `python -m pykernels.tokens`)
- measure:  times exactly a model's kernel problems (`pykernels tokens --measure`)
- layer:    one decoder layer end to end against the sum of its kernels (`python -m pykernels.tokens.layer`)
- stepops:  the rest of a step (norms, rotary, SiLU*mul, residuals, KV-cache append, argmax, dispatch), timed
- check_hf: the prediction against transformers' LlamaForCausalLM (`pykernels tokens --check hf`)
- energy:   energy meters (RAPL, NVML) read around a measurement
"""
