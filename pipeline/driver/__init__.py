"""The driver of a pretraining run, on top of every stage: plan and validate (:mod:`.prepare`, :mod:`.preflight`),
run (:mod:`.pretrain`), and the closing table (:mod:`.summary`)."""

from pipeline.driver.plan import Prepared, count_shards, prepare
from pipeline.driver.run import PretrainResult, pretrain
from pipeline.driver.summary import comparison_lines

__all__ = ["PretrainResult", "Prepared", "comparison_lines", "count_shards", "prepare", "pretrain"]
