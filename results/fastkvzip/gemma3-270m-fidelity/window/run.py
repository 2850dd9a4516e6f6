import torch
from kvevict.eval.runner import EvalConfig, run_eval
torch.set_num_threads(2)
cfg = EvalConfig(model="gemma3-270m", policies=["fastkvzip@w512", "fastkvzip@w1024", "snapkv@w512"],
                 policy_args={"fastkvzip@w512": {"window": 512}, "fastkvzip@w1024": {"window": 1024}, "snapkv@w512": {"window": 512}},
                 ratios=[0.5, 0.75], tasks=["fidelity"], context_length=4096, samples=5, seed=0, dtype="bfloat16",
                 out="results/fastkvzip/gemma3-270m-fidelity/window")
run_eval(cfg, progress=False)
