"""One run: the loss, optimizers, jitted steps, the trainer's loop, its checkpoints, stopping
on a signal, and what it reports."""
