"""The registered model: a pyfunc that scores uint8 images with the method's own test-time rule.

`mlflow.pyfunc.load_model("models:/darl-cifar10-lt-ir100@champion").predict(images)` with
images uint8 [N, 32, 32, 3] (ImageNet-LT / Places-LT: [N, S, S, 3] at the stored side S) returns one
row per image: `label`, `label_index`, `confidence`
(softmax probability of the label), `ood_score` (higher = more likely OOD: the negated test-time
confidence) and `is_ood` (at the threshold that keeps 95% of validation ID images).
"""
from __future__ import annotations

import json

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from trainables import augment, engine, large_lt, registry


class Champion(mlflow.pyfunc.PythonModel):
    # `predict` checks its uint8 image input itself; MLflow's type-hint validation has no type for
    # an image array (and would warn about the missing hint at class creation).
    _skip_type_hint_validation = True
    def load_context(self, context) -> None:
        with open(context.artifacts["meta"]) as f:
            meta = json.load(f)
        method_cls = registry.get(meta["method"])
        self.cfg = method_cls.config_cls.from_dict(meta["config"])
        self.cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg.pretrained = None   # the checkpoint holds every weight; the file need not be here
        # The images the model takes: 32x32 CIFAR, or a large set's stored squares.
        self.side = self.cfg.image_store_side if large_lt.is_large(self.cfg.dataset) else 32
        self.device = torch.device(self.cfg.device)
        self.method = method_cls(self.cfg, meta["counts"], self.device)
        self.model = self.method.build_model().to(self.device)
        state = torch.load(context.artifacts["state"], map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state.get("method", {}))
        # A feature-based score's training statistics (kNN bank, class means and precision, ReAct's
        # clip) travel in the checkpoint; the config carries the parameters a post-hoc sweep chose.
        self.method.detector = state.get("detector")
        self.model.eval()
        self.class_names = meta["class_names"]
        self.threshold = float(meta["val_confidence_threshold95"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = np.asarray(model_input)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.side, self.side, 3):
            raise ValueError(f"expected uint8 images of shape (N, {self.side}, {self.side}, 3), got "
                             f"{images.dtype} {images.shape}")
        x = augment.to_device_images(images, self.device)
        logits, conf = engine.infer(self.method, self.model, x, self.cfg.eval_batch_size,
                                    with_logits=True)
        probs = torch.from_numpy(logits).softmax(-1).numpy()
        index = probs.argmax(1)
        return pd.DataFrame({
            "label": [self.class_names[i] for i in index],
            "label_index": index,
            "confidence": probs.max(1),
            "ood_score": -conf,
            "is_ood": conf < self.threshold,
        })


# Models from code: MLflow logs this file and loads the model it names here (no pickling).
mlflow.models.set_model(Champion())
