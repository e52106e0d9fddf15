"""The protocol split (PROTOCOL.md, leave-last-out with causal history) as a Beam transform.

Interactions are keyed by user and grouped, so the work scales with the runner (DirectRunner locally,
Dataflow / Flink / Spark on a cluster); no step holds the whole dataset. The per-user logic is
``tfrec_recall.data.protocol.assign_user``, shared with the tests and the library's reader.
"""
from __future__ import annotations

from typing import Dict

import apache_beam as beam
import tensorflow as tf

from tfrec_recall._validation import require_positive_int
from tfrec_recall.data.protocol import SPLITS, assign_user, parse_interaction, to_example
from tfrec_recall.data.schema import USER_ID


def _parse(record) -> Dict[str, object]:
    example = tf.train.Example.FromString(record) if isinstance(record, bytes) else record
    return parse_interaction(example)


class LeaveLastOut(beam.PTransform):
    """PCollection of raw interaction examples (``tf.train.Example`` or serialized bytes) -> a dict
    ``{"train", "eval", "test"}`` of PCollections of serialized split examples."""

    def __init__(self, history_length: int = 50):
        super().__init__()
        self.history_length = require_positive_int("history_length", history_length)

    def expand(self, records):
        history_length = self.history_length
        assigned = (records
                    | "Parse" >> beam.Map(_parse)
                    | "KeyByUser" >> beam.Map(lambda e: (e[USER_ID], e))
                    | "GroupByUser" >> beam.GroupByKey()
                    | "AssignSplits" >> beam.FlatMap(lambda kv: assign_user(kv[1], history_length)))
        parts = assigned | "Partition" >> beam.Partition(lambda pair, n: SPLITS.index(pair[0]), len(SPLITS))
        return {name: parts[i] | f"Serialize[{name}]" >> beam.Map(lambda pair: to_example(pair[1]).SerializeToString())
                for i, name in enumerate(SPLITS)}
