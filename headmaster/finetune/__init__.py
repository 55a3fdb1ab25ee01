"""LP-FT fine-tuning: LoRA adapters on the last blocks of a backbone, trained with the heads on top.

targets.py  which modules of which architecture get adapters (a small table)
data.py     the heads' images, decoded, augmented and run once through the frozen trunk
train.py    linear probing, then adapters and heads together; the command's library function
adapters.py the adapter folder: writing it, and loading it as a registered model
"""
