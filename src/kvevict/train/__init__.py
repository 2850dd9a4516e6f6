"""Gate training: forward-only fitting of Fast KVzip's gates, Attention-Gate training on a frozen model.

Each trainer module defines `add_parser(subparsers)`, which registers `kvevict train <name> ...`.
"""

TRAINERS = {"fastkvzip": "kvevict.train.fastkvzip", "attention-gate": "kvevict.train.attention_gate"}
