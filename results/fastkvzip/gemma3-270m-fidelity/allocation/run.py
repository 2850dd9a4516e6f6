import torch, json
from kvevict.eval.runner import EvalConfig, run_eval
torch.set_num_threads(2)
cfg = EvalConfig(model="gemma3-270m", policies=["fastkvzip", "fastkvzip@uniform", "kvzip", "kvzip@uniform", "snapkv"],
                 policy_args={"fastkvzip@uniform": {"allocation": "uniform"}, "kvzip@uniform": {"allocation": "uniform"}},
                 ratios=[0, 0.5, 0.75], tasks=["fidelity"], context_length=4096, samples=5, seed=0, dtype="bfloat16",
                 out="results/fastkvzip/gemma3-270m-fidelity/allocation")
rows = run_eval(cfg, progress=False)
