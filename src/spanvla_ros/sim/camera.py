"""Pinhole cameras rendering the simulator's 3D scene: flat road surface with lane markings, vehicles as
shaded boxes, a traffic light where the scene has one. The images are rendered from simulator state (no
photorealism); what they carry is geometry the model can learn from: lanes, gaps, closing vehicles, signals.

Ground: every frame the road is rasterised once into an ego-aligned bird's-eye texture; each camera's pixels
below the horizon hit the ground at a fixed ego-frame point, so ground shading is one precomputed gather per
camera. Boxes are projected and painted far-to-near with Pillow.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SKY = np.array((150, 185, 225), np.uint8)
GRASS = np.array((78, 110, 62), np.uint8)
ASPHALT = (92, 92, 96)
MARKING = (235, 235, 235)
SIGNAL_TOP_M, SIGNAL_HEAD_M, SIGNAL_WIDTH_M = 6.0, 2.0, 1.2   # a far-side signal head, large enough to read
LIGHT_RGB = {"green": (40, 230, 60), "yellow": (250, 210, 40), "red": (240, 40, 40)}
POLE_RGB = (40, 40, 40)


@dataclass(frozen=True)
class CameraSpec:
    name: str
    yaw: float            # rad, left positive, relative to the vehicle's forward axis
    hfov: float = np.deg2rad(90.0)
    width: int = 196
    height: int = 112
    x: float = 1.5        # mount position in the vehicle frame (m)
    z: float = 1.6

    @property
    def focal(self) -> float:
        return self.width / 2.0 / np.tan(self.hfov / 2.0)


DEFAULT_CAMERAS = (CameraSpec("front", 0.0), CameraSpec("front_left", np.deg2rad(60.0)),
                   CameraSpec("front_right", np.deg2rad(-60.0)))


class BevTexture:
    """Ego-aligned top-down raster of the road: x forward in [x_min, x_max], y left in [-y_half, y_half]."""

    def __init__(self, x_min=-20.0, x_max=110.0, y_half=70.0, res=0.25):
        self.x_min, self.x_max, self.y_half, self.res = x_min, x_max, y_half, res
        self.h = int(round((x_max - x_min) / res))
        self.w = int(round(2 * y_half / res))

    def to_px(self, xy_ego: np.ndarray) -> np.ndarray:
        """(N,2) ego-frame points -> (N,2) texture pixel (col, row); row 0 is the far end."""
        col = (self.y_half - xy_ego[:, 1]) / self.res
        row = (self.x_max - xy_ego[:, 0]) / self.res
        return np.stack([col, row], 1)

    def render(self, lanes_ego: list[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]]) -> np.ndarray:
        """lanes_ego: per lane (centre, left_edge, right_edge) (N,2) polylines in the ego frame + line types."""
        img = Image.new("RGB", (self.w, self.h), tuple(int(c) for c in GRASS))
        draw = ImageDraw.Draw(img)
        for _, left, right, _ in lanes_ego:
            poly = np.concatenate([left, right[::-1]])
            draw.polygon([tuple(p) for p in self.to_px(poly)], fill=ASPHALT)
        lw = max(1, int(round(0.15 / self.res)))
        for _centre, left, right, types in lanes_ego:
            for edge, kind in ((left, types[0]), (right, types[1])):
                if kind == 0:
                    continue
                px = self.to_px(edge)
                if kind == 1:  # striped: 3 m paint, 6 m gap (edge points are ~1 m apart)
                    for i in range(0, len(px) - 3, 9):
                        draw.line([tuple(p) for p in px[i:i + 4]], fill=MARKING, width=lw)
                else:
                    draw.line([tuple(p) for p in px], fill=MARKING, width=lw)
        return np.asarray(img)


class CameraRig:
    def __init__(self, cameras=DEFAULT_CAMERAS, bev: BevTexture | None = None):
        self.cameras = tuple(cameras)
        self.bev = bev or BevTexture()
        self._ground = {c.name: self._ground_lookup(c) for c in self.cameras}

    def _rays(self, cam: CameraSpec):
        v, u = np.mgrid[0:cam.height, 0:cam.width].astype(np.float64)
        xc = (u + 0.5 - cam.width / 2) / cam.focal      # right
        yc = (v + 0.5 - cam.height / 2) / cam.focal     # down
        return xc, yc

    def _ground_lookup(self, cam: CameraSpec):
        """For pixels that see the ground: flat texture index and a distance fog weight."""
        xc, yc = self._rays(cam)
        with np.errstate(invalid="ignore", over="ignore"):
            return self._ground_lookup_impl(cam, xc, yc)

    def _ground_lookup_impl(self, cam, xc, yc):
        hit = yc > 1e-3
        depth = np.where(hit, cam.z / np.maximum(yc, 1e-3), np.inf)   # forward distance along optical axis
        fwd, right = depth, xc * depth
        c, s = np.cos(cam.yaw), np.sin(cam.yaw)
        x_ego = cam.x + c * fwd + s * right
        y_ego = s * fwd - c * right
        px = self.bev.to_px(np.stack([x_ego.ravel(), y_ego.ravel()], 1))
        col, row = np.floor(px[:, 0]).astype(np.int64), np.floor(px[:, 1]).astype(np.int64)
        inside = hit.ravel() & (col >= 0) & (col < self.bev.w) & (row >= 0) & (row < self.bev.h)
        flat = np.where(inside, row * self.bev.w + col, 0)
        fog = np.clip((depth.ravel() - 60.0) / 80.0, 0.0, 1.0)
        return hit.ravel(), inside, flat, fog

    def render(self, lanes_ego, boxes_ego, light=None) -> dict[str, np.ndarray]:
        """boxes_ego: (x, y, heading, length, width, height, rgb) in the ego frame.
        light: (x, y, state) in the ego frame, or None."""
        tex = self.bev.render(lanes_ego).reshape(-1, 3)
        out = {}
        for cam in self.cameras:
            hit, inside, flat, fog = self._ground[cam.name]
            img = np.empty((cam.height * cam.width, 3), np.float32)
            img[:] = SKY
            ground = np.where(inside[:, None], tex[flat], GRASS).astype(np.float32)
            ground = ground * (1 - fog[:, None]) + SKY * fog[:, None] * 0.8 + GRASS * fog[:, None] * 0.2
            img[hit] = ground[hit]
            pil = Image.fromarray(img.reshape(cam.height, cam.width, 3).astype(np.uint8))
            self._draw_boxes(pil, cam, boxes_ego, light)
            out[cam.name] = np.asarray(pil)
        return out

    def _project(self, cam: CameraSpec, pts: np.ndarray):
        """(N,3) ego-frame points -> (N,2) pixels and (N,) depth."""
        c, s = np.cos(cam.yaw), np.sin(cam.yaw)
        dx, dy, dz = pts[:, 0] - cam.x, pts[:, 1], pts[:, 2] - cam.z
        fwd = c * dx + s * dy
        right = s * dx - c * dy
        depth = np.maximum(fwd, 1e-6)
        u = cam.width / 2 + cam.focal * right / depth
        v = cam.height / 2 - cam.focal * dz / depth
        return np.stack([u, v], 1), fwd

    def _draw_boxes(self, pil: Image.Image, cam: CameraSpec, boxes, light) -> None:
        draw = ImageDraw.Draw(pil)
        faces = []
        items = [(x, y, h, length, width, 0.0, height, rgb) for x, y, h, length, width, height, rgb in boxes]
        if light is not None:
            lx, ly, state = light
            head_bottom = SIGNAL_TOP_M - SIGNAL_HEAD_M
            items.append((lx, ly, 0.0, 0.4, 0.4, 0.0, head_bottom, POLE_RGB))  # pole
            items.append((lx, ly, 0.0, 0.5, SIGNAL_WIDTH_M, head_bottom, SIGNAL_TOP_M,
                          LIGHT_RGB.get(state, (128, 128, 128))))
        for x, y, h, length, width, z0, height, rgb in items:
            dx, dy = np.cos(h), np.sin(h)
            corners2d = np.array([[x + a * dx * length / 2 - b * dy * width / 2,
                                   y + a * dy * length / 2 + b * dx * width / 2]
                                  for a, b in ((1, 1), (1, -1), (-1, -1), (-1, 1))])
            bottom = np.c_[corners2d, np.full(4, z0)]
            top = np.c_[corners2d, np.full(4, height)]
            uv_b, d_b = self._project(cam, bottom)
            uv_t, d_t = self._project(cam, top)
            for i in range(4):
                j = (i + 1) % 4
                quad_d = np.array([d_b[i], d_b[j], d_t[j], d_t[i]])
                if (quad_d < 0.5).any():
                    continue
                shade = 0.65 + 0.35 * abs(np.cos(h + np.pi / 2 * i))
                faces.append((quad_d.mean(), [tuple(uv_b[i]), tuple(uv_b[j]), tuple(uv_t[j]), tuple(uv_t[i])],
                              tuple(int(c * shade) for c in rgb)))
            if (d_t >= 0.5).all():
                faces.append((d_t.mean() + 0.01, [tuple(p) for p in uv_t], tuple(min(255, int(c * 1.1)) for c in rgb)))
        for _, quad, color in sorted(faces, key=lambda f: -f[0]):
            if all(abs(u) < 1e4 and abs(v) < 1e4 for u, v in quad):
                draw.polygon(quad, fill=color)


def vehicle_color(vid: int) -> tuple[int, int, int]:
    palette = ((200, 40, 40), (40, 80, 200), (230, 230, 230), (30, 30, 30), (200, 170, 40), (60, 150, 90))
    return palette[vid % len(palette)]
