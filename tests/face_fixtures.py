"""A face-detector file in the real YuNet ONNX layout (OpenCV Zoo's face_detection_yunet_2023mar: input
[1, 3, H, W] BGR, outputs cls_/obj_/bbox_/kps_ at strides 8, 16, 32), built with onnx.helper. Its outputs
are fixed (plus 0 x the input's mean, so the graph reads its input): one face, five landmarks, at a
known place of a `size` x `size` image. OpenCV's FaceDetectorYN decodes it as it decodes the real one."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

FFHQ = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                 [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)


def planted_face(size: int = 160) -> tuple[tuple[float, float, float, float], np.ndarray]:
    """(box x, y, w, h) and the five landmarks the detector file reports for a size x size image."""
    centre, width = size / 2, size * 0.4
    landmarks = centre + (FFHQ - 256) * (width / 256)
    return (centre - width / 2, centre - width / 2, width, width), landmarks


def write_yunet(path: Path, size: int = 160) -> Path:
    import onnx
    from onnx import TensorProto, helper

    box, landmarks = planted_face(size)
    nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"])]
    inits = [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]
    outputs = []
    for stride in (8, 16, 32):
        cols = size // stride
        n = cols * cols
        cls, obj = np.zeros((1, n, 1), np.float32), np.zeros((1, n, 1), np.float32)
        bbox, kps = np.zeros((1, n, 4), np.float32), np.zeros((1, n, 10), np.float32)
        if stride == 32:
            cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
            c, r = int(cx // stride), int(cy // stride)
            i = r * cols + c
            cls[0, i, 0] = obj[0, i, 0] = 0.95
            bbox[0, i] = [cx / stride - c, cy / stride - r, math.log(box[2] / stride), math.log(box[3] / stride)]
            kps[0, i] = (landmarks / stride - [c, r]).reshape(-1)
        for name, value in (("cls", cls), ("obj", obj), ("bbox", bbox), ("kps", kps)):
            out = f"{name}_{stride}"
            inits.append(helper.make_tensor(f"{out}_const", TensorProto.FLOAT, value.shape, value.reshape(-1)))
            nodes.append(helper.make_node("Add", [f"{out}_const", "nothing"], [out]))
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, list(value.shape)))
    order = [f"{k}_{s}" for k in ("cls", "obj", "bbox", "kps") for s in (8, 16, 32)]
    outputs.sort(key=lambda o: order.index(o.name))
    graph = helper.make_graph(nodes, "yunet-fixture",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
