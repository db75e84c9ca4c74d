"""The training engine: one loop (trainer.py) driving engine `ddp` or `deepspeed` behind the same
step()/save()/load() surface, with checkpoints (checkpoint.py), logging (logger.py), health checks
(health.py), preemption (preemption.py) and epoch-end monitors (online_eval.py)."""
