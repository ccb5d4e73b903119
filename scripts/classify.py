"""Classify photos with an exported run and onnxruntime alone (nothing of this project imported): copy this file
beside `runs/<run>/export/` and run `python classify.py runs/<run>/export photo.png ...`."""

import json
import sys

import cv2
import numpy as np
import onnxruntime as ort

folder, photos = sys.argv[1], sys.argv[2:]
card = json.load(open(f"{folder}/model.json"))
step = card["preprocessing"]
session = ort.InferenceSession(f"{folder}/model.onnx")


def prepare(path):
    img = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    if step["background"] is not None:  # the plant mask: the green plant kept, the gravel dimmed or blacked out
        h, w = img.shape[:2]
        scale = step.get("mask_side", max(h, w)) / max(h, w)  # found on the photo shrunk to a bounded side
        if scale < 1:
            img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        mask = cv2.inRange(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), *map(tuple, step["green_hsv"]))
        k = max(3, round(min(img.shape[:2]) / 60) | 1)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = cv2.dilate(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel), kernel)
        if (mask > 0).mean() >= step["min_plant"]:
            keep = np.where(mask[..., None] > 0, 1.0, step["background"]).astype(np.float32)
            img = (img * keep).round().astype(np.uint8)
    side = step["cache_size"]
    img = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA if side < min(img.shape[:2]) else cv2.INTER_CUBIC)
    return cv2.resize(img, (step["size"], step["size"]), interpolation=cv2.INTER_AREA)


for i in range(0, len(photos), 16):  # a few photos at a time: the graph runs every TTA view of each at once
    batch = photos[i : i + 16]
    probs = session.run(None, {"image": np.stack([prepare(p) for p in batch])})[0]
    for path, p in zip(batch, probs):
        print(path, card["classes"][p.argmax()], f"{p.max():.3f}")
