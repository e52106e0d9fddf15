"""Training callbacks: periodic validation metrics in the logs, and the guard against non-finite losses."""
from __future__ import annotations

import concurrent.futures
import math
from typing import Optional, Sequence

import tensorflow as tf

from tfrec_recall._validation import require_positive_int


def outside_strategy(fn):
    """``fn()``, out of the distribution strategy's scope that ``fit`` runs callbacks in: evaluation builds an
    index whose string variables a multi-worker strategy would mirror (a collective broadcast, which has no
    string kernel). A strategy's scope is thread-local, so a helper thread runs ``fn`` without it; every worker
    evaluates the same model alone."""
    if not tf.distribute.has_strategy():
        return fn()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluation") as pool:
        return pool.submit(fn).result()


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the epoch, the batch and likely causes."""


class StopOnNonFiniteLoss(tf.keras.callbacks.Callback):
    """Raises :class:`NonFiniteLossError` at the first batch whose logged loss is NaN or infinite, instead of
    training on (Keras' ``TerminateOnNaN`` stops quietly and the run would report metrics of a broken model).
    ``hint`` names the settings most likely at fault, e.g. ``"learning_rate=0.1, temperature=0.05"``."""

    def __init__(self, hint: str = ""):
        super().__init__()
        self.hint = hint
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            causes = f" ({self.hint})" if self.hint else ""
            raise NonFiniteLossError(
                f"training loss became {float(loss)} at epoch {self.epoch + 1}, batch {batch + 1}: the learning "
                f"rate may be too high or the temperature too low{causes}; lower the learning rate or raise the "
                "temperature")


class RetrievalEvaluation(tf.keras.callbacks.Callback):
    """Runs an evaluation function at the end of every ``every`` epochs and adds its metrics to the logs
    (prefixed ``val_``), so ``History`` and other callbacks see them."""

    def __init__(self, evaluate_fn, every: int = 1, prefix: str = "val_", keys: Optional[Sequence[str]] = None):
        super().__init__()
        require_positive_int("every", every)
        self.evaluate_fn, self.every, self.prefix, self.keys = evaluate_fn, every, prefix, keys

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        metrics = outside_strategy(self.evaluate_fn)
        if logs is not None:
            for name, value in metrics.items():
                if name != "users" and (self.keys is None or name in self.keys):
                    logs[self.prefix + name] = float(value)
