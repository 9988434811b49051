"""Face restoration: detect faces (OpenCV's YuNet, a local .onnx file), align each to the FFHQ 512 crop,
restore it with GFPGAN or CodeFormer (spandrel / spandrel_extra_arches, read through weights_io), and
paste it back with a feathered mask.

Why not facexlib: it needs torchvision and downloads its detector at run time. OpenCV's FaceDetectorYN
reads a local file and runs no Python from it. The alignment and paste-back (a similarity transform to
the five-point FFHQ template, its inverse, a blurred mask) are hand-written: a few OpenCV calls.
"""
from __future__ import annotations

import threading
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

FACE_SIZE = 512
# The five FFHQ landmarks at 512x512 (eyes, nose tip, mouth corners; the subject's right eye first),
# the template GFPGAN and CodeFormer were trained on.
FFHQ_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
MIN_SCORE = 0.6
MAX_FACES = 32


class FaceDetector:
    """YuNet through cv2.FaceDetectorYN: (N, 15) rows of box, five landmarks and score."""

    def __init__(self, onnx_path: Any):
        self.path = str(onnx_path)
        self._net = cv2.FaceDetectorYN.create(self.path, "", (320, 320), MIN_SCORE, 0.3, MAX_FACES)
        self._lock = threading.Lock()

    def detect(self, bgr: np.ndarray) -> np.ndarray:
        with self._lock:
            self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, faces = self._net.detect(bgr)
        return np.zeros((0, 15), np.float32) if faces is None else faces[:MAX_FACES]


def _load_restorer(path: Any) -> Any:
    from modules.models.upscaler_models import read_model

    model = read_model(path)
    if str(model.purpose) != "FaceSR":
        raise ValueError(f"{path}: a {model.architecture.id} model, not a face restorer")
    return model


def _run(model: Any, face_rgb: np.ndarray, name: str, weight: float) -> np.ndarray:
    """One aligned 512x512 RGB uint8 face through the restorer ([-1, 1] in and out, as they were trained)."""
    x = torch.from_numpy(face_rgb.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.inference_mode():
        out = model.model(x, weight=weight)[0] if name == "CodeFormer" else model.model(x)[0]
    out = ((out[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return out


def _paste(base: np.ndarray, face: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """`face` (aligned) warped back into `base` with a feathered mask."""
    h, w = base.shape[:2]
    back = cv2.warpAffine(face, inverse, (w, h), flags=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(np.ones((FACE_SIZE, FACE_SIZE), np.float32), inverse, (w, h), flags=cv2.INTER_LINEAR)
    size = max(3, int(np.sqrt(mask.sum()) * 0.06) | 1)
    mask = cv2.erode(mask, np.ones((size, size), np.uint8))
    mask = cv2.GaussianBlur(mask, (size * 2 + 1, size * 2 + 1), 0)[..., None]
    return (base * (1 - mask) + back * mask).round().clip(0, 255).astype(np.uint8)


class FaceRestorer:
    """The detector and the restorers of one set of files (core.face_restoration.FaceFiles)."""

    def __init__(self, files: Any):
        self.files = files
        self.detector = FaceDetector(files.detector)
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _model(self, name: str) -> Any:
        with self._lock:
            if name not in self._models:
                self._models[name] = _load_restorer(self.files.gfpgan if name == "GFPGAN" else self.files.codeformer)
            return self._models[name]

    def faces(self, image: Image.Image) -> np.ndarray:
        return self.detector.detect(cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR))

    def restore(self, image: Image.Image, name: str, visibility: float = 1.0, weight: float = 0.5) -> Image.Image:
        rgb = np.asarray(image.convert("RGB"))
        faces = self.faces(image)
        if len(faces) == 0:
            return image.convert("RGB")
        model = self._model(name)
        out = rgb.copy()
        for row in faces:
            landmarks = row[4:14].reshape(5, 2).astype(np.float32)
            affine, _ = cv2.estimateAffinePartial2D(landmarks, FFHQ_TEMPLATE, method=cv2.LMEDS)
            if affine is None:
                continue
            face = cv2.warpAffine(rgb, affine, (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REPLICATE)
            restored = _run(model, face, name, weight)
            out = _paste(out, restored, cv2.invertAffineTransform(affine))
        result = Image.fromarray(out)
        return result if visibility >= 1 else Image.blend(image.convert("RGB"), result, visibility)
