"""Evaluation of a teacher: embedding (Ray Data batch inference), the faiss index, weighted k-NN as the paper
does it, queries against a saved index, the linear probe, and the teacher as an MLflow model."""

from pipeline.eval.contact_sheet import Tile
from pipeline.eval.contact_sheet import render as render_sheet
from pipeline.eval.embed import BackboneSpec, decode_views, embed_in_process
from pipeline.eval.faiss_index import MANIFEST_FILE, IndexFolder, load_index_dir
from pipeline.eval.features import Embeddings
from pipeline.eval.knn import KnnRequest, evaluate_teacher, knn_accuracies, require_labels
from pipeline.eval.linear_probe import (
    PROBE_NEEDS,
    ProbeRequest,
    ProbeSettings,
    classifier_files,
    feature_layout,
    run_probe,
    scaled_lr,
)
from pipeline.eval.query import (
    QueryResult,
    embed_files,
    find_teacher,
    load_query_model,
    lookup_keys,
    neighbours,
    read_images,
    thumbnail,
)
from pipeline.eval.start import START_METRICS, compare_with_start, measure_start

__all__ = [
    "QueryResult",
    "Tile",
    "embed_files",
    "find_teacher",
    "load_query_model",
    "lookup_keys",
    "neighbours",
    "read_images",
    "render_sheet",
    "thumbnail",
    "MANIFEST_FILE",
    "PROBE_NEEDS",
    "START_METRICS",
    "compare_with_start",
    "measure_start",
    "BackboneSpec",
    "Embeddings",
    "IndexFolder",
    "KnnRequest",
    "ProbeRequest",
    "ProbeSettings",
    "classifier_files",
    "decode_views",
    "embed_in_process",
    "evaluate_teacher",
    "feature_layout",
    "knn_accuracies",
    "load_index_dir",
    "require_labels",
    "run_probe",
    "scaled_lr",
]
