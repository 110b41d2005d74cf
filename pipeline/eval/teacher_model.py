"""The exported teacher as an MLflow model: encoded images in, L2-normalised CLS embeddings out.

A ``python_function`` model (:class:`TeacherEmbedder`) whose one artifact is the exported teacher folder
(``teacher_backbone.safetensors`` + ``teacher.json``, see :mod:`pipeline.weights.checkpoint`). It embeds exactly
as the k-NN index does (:func:`pipeline.eval.embed.decode_views` then :func:`dino.eval_view.embed_views`):
decode with PIL, shorter side to 256/224 of ``image_size`` (bicubic), centre crop, ImageNet normalisation, CLS
feature, L2 normalisation. ``image_size`` is the export's (``knn.image_size``, else the global crop size). No Ray::

    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model("models:/dino-imagenette-imagenette/1")
    emb = model.predict(pd.DataFrame({"image": [open("cat.jpg", "rb").read()]}))  # (1, D) float32
    emb = model.predict({"image": [rgb]})  # rgb: a uint8 (H, W, 3) array, same view and features

A row that is neither (corrupt bytes, a float array, None) fails the call with one line naming the row.

Where its code comes from: the model carries this repository's ``dino`` and ``pipeline`` packages as
MLflow ``code_paths`` (``code/`` inside the model, put on ``sys.path`` by ``mlflow.pyfunc.load_model``), so
it loads in any Python environment with its pip requirements (torch, torchvision, timm, safetensors,
pillow, opencv, mlflow), with or without this repository installed. A process that has already imported
``pipeline`` (this venv, which installs it in editable mode) uses its own copy.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd  # the predict method's type hint: MLflow reads it when the class is defined

log = logging.getLogger(__name__)

INPUT_COLUMN = "image"  # encoded image bytes (JPEG, PNG, WebP, ... anything PIL decodes), or uint8 (H, W, 3) arrays
MODEL_NAME = "teacher"  # the LoggedModel's name in the run ("Logged models" on the run page)
ARTIFACT_KEY = "teacher"  # the teacher folder inside the model's artifacts
# What the model's code imports (dino.augment, which holds the decoder, imports OpenCV).
_REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "safetensors",
    "pillow",
    "opencv-python-headless",
    "numpy",
    "pandas",
)


def _repo_packages() -> list[str]:
    """This repository's ``dino`` and ``pipeline`` package folders (the model's ``code_paths``)."""
    pipeline = Path(__file__).resolve().parents[1]
    return [str(pipeline.parent / "dino"), str(pipeline)]


def _pip_requirements() -> list[str]:
    """Pinned to this environment's versions (MLflow's own inference would load the model in a subprocess)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in _REQUIREMENTS]  # no "+cu121": PyPI has none


def embed_image_bytes(model, images: list, image_size: int, device, batch_size: int = 64) -> np.ndarray:
    """Encoded images (or uint8 pixel arrays) -> ``(N, D)`` float32 L2-normalised CLS features, by the
    k-NN index's view.

    Raises:
        ValueError: one line naming the first row that is neither a decodable image nor a uint8 array.
    """
    import torch

    from dino.augment import decode_image
    from dino.eval_view import center_view, embed_views

    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        views = np.empty((len(chunk), image_size, image_size, 3), np.uint8)  # (B, S, S, 3)
        for i, data in enumerate(chunk):
            try:
                views[i] = center_view(_as_image(data, decode_image), image_size)
            except Exception as e:  # corrupt, truncated, not an image, None, a float array
                reason = _OBJECT_REPR.sub("", " ".join(str(e).split()))[:200]  # one line, no "<_io.BytesIO at 0x..>"
                raise ValueError(
                    f"row {start + i} of column {INPUT_COLUMN!r} is not a decodable image or uint8 array "
                    f"({type(e).__name__}: {reason})"
                ) from None
        out.append(embed_views(model, torch.from_numpy(views), device).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_features), np.float32)


_OBJECT_REPR = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")


def _as_image(data, decode_image):
    """One row -> a PIL image: encoded bytes are decoded by PIL; a uint8 array ``(H, W)``, ``(H, W, 1)``,
    ``(H, W, 3)`` (RGB) or ``(H, W, 4)`` (RGBA) is taken as pixels."""
    from PIL import Image

    if isinstance(data, np.ndarray) and data.dtype != object:
        if data.dtype != np.uint8 or data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[2] not in (1, 3, 4)):
            raise TypeError(
                f"an array must be uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {data.dtype} {data.shape}"
            )
        return Image.fromarray(np.ascontiguousarray(data[..., 0] if data.ndim == 3 and data.shape[2] == 1 else data))
    return decode_image(bytes(data))


try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover  (mlflow is a dependency; this keeps the module importable without it)
    PythonModel = object


class TeacherEmbedder(PythonModel):
    """``predict(DataFrame with an "image" column of encoded bytes or uint8 arrays) -> (N, D) float32``, rows
    of unit norm."""

    def load_context(self, context) -> None:
        import torch

        from pipeline.weights.checkpoint import load_teacher

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, meta = load_teacher(context.artifacts[ARTIFACT_KEY])
        self.model, self.image_size = model.to(self.device), int(meta["image_size"])

    # Hinted as a DataFrame (what the pyfunc's column signature hands it): MLflow takes that hint as "validate
    # against the logged signature", and warns about a predict method without one.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        images = _image_column(model_input)
        return embed_image_bytes(self.model, images, self.image_size, self.device)


def _image_column(model_input) -> list:
    """The ``image`` column of a DataFrame (or dict of columns, or a list) as a list of rows."""
    if hasattr(model_input, "columns"):  # pandas
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(
                f"expected a column {INPUT_COLUMN!r} of encoded image bytes, got columns {list(model_input.columns)}"
            )
        return list(model_input[INPUT_COLUMN])
    if isinstance(model_input, dict):
        return list(model_input[INPUT_COLUMN])
    return list(model_input)


def example_images(n: int = 2, size: tuple[int, int] = (48, 40)) -> list[bytes]:
    """``n`` small PNGs (colour gradients, ``size`` = (W, H)): the model's input example."""
    from PIL import Image

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 60 + 120 * i)], -1)
        buf = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def signature(feature_dim: int):
    """Input: one binary column ``image``; output: a float32 ``(-1, feature_dim)`` tensor."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("binary", INPUT_COLUMN)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, feature_dim))]),
    )


@contextmanager
def tracking_uri_set(uri: str):
    """MLflow's global tracking URI set to ``uri`` for the block, then put back as it was (the model
    logging API reads only the global one, and so does the registry when it resolves a ``models:/<id>`` source;
    the rest of the pipeline passes URIs to its clients)."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None: back to unset (it also clears the variable ...)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env  # ... which the user may have set


def log_teacher_model(tracking_uri: str, run_id: str, teacher_dir: str | Path):
    """Log the exported teacher in ``teacher_dir`` to run ``run_id`` as a pyfunc model named ``teacher``.

    Returns MLflow's ``ModelInfo`` (``model_uri`` = ``models:/<model id>``, ``model_id``), ready for
    ``MlflowClient.create_model_version(name, source=info.model_uri, run_id=run_id, model_id=info.model_id)``.
    The input example is checked by MLflow: it loads the saved model and predicts on it once. MLflow
    also copies the run's params to the model and links the run's metrics at the teacher's
    ``global_step`` (it reads every metric's history once to find them).
    """
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import Model

    from pipeline.weights.checkpoint import load_teacher

    model, meta = load_teacher(teacher_dir)
    with tracking_uri_set(tracking_uri):
        return Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            step=int(meta.get("global_step") or 0),  # MLflow links the run's metrics of this step to the model
            python_model=TeacherEmbedder(),
            artifacts={ARTIFACT_KEY: str(teacher_dir)},
            code_paths=_repo_packages(),
            pip_requirements=_pip_requirements(),
            signature=signature(int(model.num_features)),
            input_example=pd.DataFrame({INPUT_COLUMN: example_images()}),
            metadata={
                "timm_arch": meta["arch"],
                "image_size": int(meta["image_size"]),
                "feature_dim": int(model.num_features),
                "embedding": "L2-normalised CLS feature",
            },
            tags={"timm_arch": meta["arch"], "image_size": str(meta["image_size"])},
        )


def register_teacher(tracking_uri: str, run_id: str, teacher_dir: Path, name: str | None, run_name: str) -> str | None:
    """Log the exported teacher as an MLflow model of the run and register that model.

    The model (:mod:`pipeline.eval.teacher_model`: images in, L2-normalised CLS embeddings out) is what
    ``mlflow.pyfunc.load_model("models:/<name>/<version>")`` loads; the safetensors + ``teacher.json``
    export stays the run's ``teacher/`` artifact beside it (for timm, and for the k-NN jobs). ``name``:
    the registered model's (``tracking.register_model``, ``auto`` resolved by the driver to
    ``dino-<dataset>-<preset>``; None logs the model without registering it); tags carry the timm arch and
    image size so a user can rebuild the backbone; ``run_name`` goes into the version's description.
    Model-logging and registry errors warn; they never fail the run. Returns ``"name/version"`` or None.
    """
    from pipeline.tracking import mlflow_client
    from pipeline.weights.checkpoint import TEACHER_WEIGHTS

    client = mlflow_client(tracking_uri)
    try:
        info = log_teacher_model(tracking_uri, run_id, teacher_dir)
    except Exception as e:  # noqa: BLE001
        log.warning(
            "could not log the teacher as an MLflow model (the teacher/ artifact is there): %s: %s",
            type(e).__name__,
            " ".join(str(e).split())[:500],
        )
        return None
    if not name:
        return None
    meta = json.loads((teacher_dir / "teacher.json").read_text())
    try:
        try:
            client.create_registered_model(
                name,
                description="DINO teacher backbones: images in, L2-normalised CLS "
                "embeddings out (mlflow.pyfunc); weights for timm in "
                "the run's teacher/ artifact",
            )
        except Exception as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e) and "already exists" not in str(e):
                raise
        with tracking_uri_set(tracking_uri):  # the registry resolves the models:/ source through the global URI
            version = client.create_model_version(
                name,
                source=info.model_uri,
                run_id=run_id,
                model_id=info.model_id,
                tags={
                    "timm_arch": meta["arch"],
                    "image_size": str(meta["image_size"]),
                    "global_step": str(meta.get("global_step")),
                    "format": "pyfunc",
                    "timm_weights": f"runs:/{run_id}/teacher/{TEACHER_WEIGHTS}",
                },
                description=f"{meta['arch']} teacher of run {run_name} at step {meta.get('global_step')}",
            )
    except Exception as e:
        log.warning("could not register the teacher in the MLflow model registry as %s: %s", name, e)
        return None
    client.set_tag(run_id, "registered_model", f"{name}/{version.version}")
    log.info("teacher registered as model %s version %s", name, version.version)
    return f"{name}/{version.version}"
