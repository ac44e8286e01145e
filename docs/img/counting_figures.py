"""Draws the figures of docs/counting.md from the sample videos (OpenCV only).

.venv/bin/python docs/img/counting_figures.py   # writes docs/img/*.png
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from flowfleet.agent.speed import GroundPlane, homography_spec
from flowfleet.data import data_dir

OUT = Path(__file__).resolve().parent
GREEN, RED, YELLOW, CYAN, WHITE = (
    (60, 200, 60),
    (60, 60, 230),
    (0, 220, 255),
    (255, 200, 0),
    (255, 255, 255),
)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def frame(video: str, index: int) -> np.ndarray:
    cap = cv2.VideoCapture(str(data_dir() / "videos" / video))
    cap.set(cv2.CAP_PROP_POS_FRAMES, index)
    ok, image = cap.read()
    cap.release()
    if not ok:
        raise SystemExit(f"cannot read frame {index} of {video}")
    return image


def label(img, text, org, color=WHITE, scale=0.55, thick=1):
    x, y = org
    (w, h), base = cv2.getTextSize(text, FONT, scale, thick)
    cv2.rectangle(img, (x - 3, y - h - 4), (x + w + 3, y + base), (0, 0, 0), -1)
    cv2.putText(img, text, (x, y), FONT, scale, color, thick, cv2.LINE_AA)


def arrow(img, tail, head, color, text, text_at):
    cv2.arrowedLine(img, tail, head, color, 3, cv2.LINE_AA, tipLength=0.25)
    label(img, text, text_at, color, 0.6, 2)


def draw_line(img, name, a, b, name_at, hysteresis=8):
    overlay = img.copy()
    u = (np.asarray(b, float) - a) / np.linalg.norm(np.asarray(b, float) - a)
    right = np.array([-u[1], u[0]])  # image coords (y down): the right of A->B
    band = [
        np.asarray(p, float) + right * s * hysteresis for p, s in ((a, 1), (b, 1), (b, -1), (a, -1))
    ]
    cv2.fillPoly(overlay, [np.array(band, np.int32)], YELLOW)
    cv2.addWeighted(overlay, 0.3, img, 0.7, 0, img)
    cv2.line(img, a, b, YELLOW, 2, cv2.LINE_AA)
    for p, t in ((a, "A"), (b, "B")):
        cv2.circle(img, p, 6, YELLOW, -1)
        x = p[0] + 9 if p[0] < img.shape[1] - 40 else p[0] - 28
        label(img, t, (x, p[1] - 8), YELLOW, 0.6, 2)
    label(img, f"line {name}", name_at, YELLOW)


def lines_and_zone() -> None:
    src = frame("one-by-one-person-detection.mp4", 300)
    h, w = src.shape[:2]
    img = np.zeros((h + 90, w, 3), np.uint8)  # room below the frame for the arrows
    img[:h] = src
    zone = np.array([[300, 300], [640, 300], [640, 432], [300, 432]], np.int32)
    overlay = img.copy()
    cv2.fillPoly(overlay, [zone], CYAN)
    cv2.addWeighted(overlay, 0.22, img, 0.78, 0, img)
    cv2.polylines(img, [zone], True, CYAN, 2, cv2.LINE_AA)
    label(img, "zone table", (306, 322), CYAN)
    # approach: A=(768,415) -> B=(0,415), drawn right to left: "in" is moving up.
    draw_line(img, "approach  A=(768,415) B=(0,415)", (760, 415), (8, 415), (20, 505))
    arrow(img, (210, 470), (210, 370), GREEN, "in", (222, 385))
    arrow(img, (120, 370), (120, 470), RED, "out", (132, 465))
    # leave: A=(620,300) -> B=(620,432), drawn top to bottom: "in" is moving left.
    draw_line(img, "leave", (620, 300), (620, 432), (650, 290))
    arrow(img, (700, 345), (560, 345), GREEN, "in", (560, 335))
    arrow(img, (560, 395), (700, 395), RED, "out", (700, 388))
    # The person's box and its anchor (bottom centre): the point that crosses lines.
    x1, y1, x2, y2 = 382, 5, 542, 382
    cv2.rectangle(img, (x1, y1), (x2, y2), WHITE, 1, cv2.LINE_AA)
    anchor = ((x1 + x2) // 2, y2)
    cv2.circle(img, anchor, 7, (255, 0, 255), -1)
    cv2.line(img, (250, 296), anchor, (255, 0, 255), 1, cv2.LINE_AA)
    label(img, "anchor: bottom centre of the box", (20, 300), (255, 0, 255), 0.5)
    label(img, "in = crossing from the LEFT of A->B to its RIGHT", (10, 24))
    label(img, "(as seen on the image; out = the other way)", (10, 48))
    label(img, "shaded band = hysteresis, 8 px each side", (330, 505), YELLOW)
    cv2.imwrite(str(OUT / "counting-lines.png"), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])


def speed_calibration() -> None:
    img = frame("traffic_frames.mp4", 0)
    image_pts = [(100, 375), (900, 375), (900, 425), (100, 425)]
    ground_pts = [(0, 3.7), (15.1, 3.7), (15.1, 0), (0, 0)]
    plane = GroundPlane(homography_spec(image_pts, ground_pts))
    inv = np.linalg.inv(plane.matrix)

    def to_image(gx, gy):
        q = inv @ (gx, gy, 1.0)
        return tuple(int(v) for v in q[:2] / q[2])

    # A 1 m ground grid over the road, drawn through the calibration's inverse.
    for gx in range(-1, 18):
        cv2.line(img, to_image(gx, -1.5), to_image(gx, 5.5), (210, 210, 210), 1, cv2.LINE_AA)
    for gy in range(-1, 6):
        cv2.line(img, to_image(-1, gy), to_image(17, gy), (210, 210, 210), 1, cv2.LINE_AA)
    cv2.polylines(img, [np.array(image_pts, np.int32)], True, YELLOW, 3, cv2.LINE_AA)
    offsets = [(-40, -16), (-330, -16), (-330, 36), (-40, 36)]
    for n, ((x, y), (gx, gy), (dx, dy)) in enumerate(
        zip(image_pts, ground_pts, offsets, strict=True), 1
    ):
        cv2.circle(img, (x, y), 8, YELLOW, -1)
        label(img, f"{n}: ({x},{y}) px = ({gx:g}, {gy:g}) m", (x + dx, y + dy), YELLOW, 0.7, 2)
    label(img, "4 ground points, each: image pixels = ground metres", (10, 30), WHITE, 0.8, 2)
    label(img, "grey grid: 1 m squares on the road, through the homography", (10, 64),
          (210, 210, 210), 0.8, 2)  # fmt: skip
    small = cv2.resize(img, (768, 432), interpolation=cv2.INTER_AREA)
    small = (small // 8) * 8 + 4  # fewer distinct colours: a much smaller PNG
    cv2.imwrite(str(OUT / "speed-calibration.png"), small, [cv2.IMWRITE_PNG_COMPRESSION, 9])


if __name__ == "__main__":
    lines_and_zone()
    speed_calibration()
    for p in sorted(OUT.glob("*.png")):
        print(f"{p}: {p.stat().st_size // 1024} KB")
