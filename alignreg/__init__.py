"""alignreg: a distributed RL trainer for LLM alignment and offline RL built around pluggable
policy regularizers. ``import alignreg`` stays light: ray, vllm and deepspeed are imported only by
the modules that use them."""
__version__ = "0.1.0"
