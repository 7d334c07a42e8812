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

RGB = tuple[int, int, int]
SIGNAL_TOP_M, SIGNAL_HEAD_M, SIGNAL_WIDTH_M = 6.0, 2.0, 1.2   # a far-side signal head, large enough to read
LIGHT_RGB = {"green": (40, 230, 60), "yellow": (250, 210, 40), "red": (240, 40, 40)}
POLE_RGB = (40, 40, 40)
CLEAR_DAY_FOG_START_M = 1e6   # haze that starts this far off: none in view


def _rgb(values) -> RGB:
    r, g, b = (int(np.clip(round(float(v)), 0, 255)) for v in values)
    return r, g, b


@dataclass(frozen=True)
class Appearance:
    """How the world looks: surface colours, paint, vehicle paint and the camera's exposure and noise. Geometry
    (and so every label) does not depend on it. ``DEFAULT_APPEARANCE`` is the simulator's own look;
    ``Appearance.sample`` draws another one (domain randomisation), so a perception head trained on many looks keys
    on vehicles and lanes rather than on the one palette it was trained on."""

    sky: RGB = (150, 185, 225)
    ground: RGB = (78, 110, 62)          # off the road: grass, or a paved / sandy / dark shoulder
    asphalt: RGB = (92, 92, 96)
    marking: RGB = (235, 235, 235)
    marking_width_m: float = 0.15
    vehicle_palette: tuple[RGB, ...] = ((200, 40, 40), (40, 80, 200), (230, 230, 230), (30, 30, 30), (200, 170, 40),
                                        (60, 150, 90))
    fog_start_m: float = 60.0            # haze: the ground fades into the sky from here ...
    fog_range_m: float = 80.0            # ... over this distance (a clear day: a far start, a hard horizon)
    gain: float = 1.0                    # exposure: every pixel scaled
    noise_std: float = 0.0               # sensor noise, grey levels
    noise_seed: int = 0

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Appearance:
        def grey(lo: float, hi: float, tint: float) -> RGB:
            g = rng.uniform(lo, hi)
            return _rgb(g + rng.uniform(-tint, tint, 3))

        sky_grey = rng.uniform(150, 245)
        blue = rng.uniform(0, 45)                              # 0: overcast white-grey .. 45: clear blue
        sky = _rgb((sky_grey - blue, sky_grey - blue / 3, sky_grey + blue / 3))
        asphalt = grey(45, 150, 6)
        shoulder = rng.integers(4)
        if shoulder == 0:                                       # grass
            ground = _rgb((rng.uniform(40, 120), rng.uniform(70, 160), rng.uniform(30, 90)))
        elif shoulder == 1:                                     # paved: the road surface runs on past the lanes
            ground = _rgb(np.array(asphalt) + rng.uniform(-15, 15))
        elif shoulder == 2:                                     # sand / dry soil
            ground = _rgb((rng.uniform(140, 210), rng.uniform(120, 180), rng.uniform(80, 130)))
        else:                                                   # dark soil / gravel
            ground = grey(30, 90, 10)
        paint = rng.uniform(170, 255)
        marking = _rgb((paint, paint * rng.uniform(0.8, 0.9), paint * rng.uniform(0.2, 0.5)) if rng.random() < 0.3
                       else paint + rng.uniform(-8, 8, 3))             # yellow or white paint
        palette = tuple(_rgb(rng.uniform(15, 245, 3)) for _ in range(8))
        # haze hides the horizon's edge; without it the road meets the sky in a hard line, where at the default
        # look only a vehicle has a hard edge
        fog_start = float(rng.uniform(40, 150)) if rng.random() < 0.6 else CLEAR_DAY_FOG_START_M
        return cls(sky=sky, ground=ground, asphalt=asphalt, marking=marking,
                   marking_width_m=float(rng.uniform(0.08, 0.3)), vehicle_palette=palette,
                   fog_start_m=fog_start, fog_range_m=float(rng.uniform(40, 250)),
                   gain=float(rng.uniform(0.7, 1.3)), noise_std=float(rng.uniform(0, 10)),
                   noise_seed=int(rng.integers(2**31)))

    def vehicle_rgb(self, vid: int) -> RGB:
        return self.vehicle_palette[vid % len(self.vehicle_palette)]

    def expose(self, img: np.ndarray, frame: int) -> np.ndarray:
        """The camera's exposure and noise on a rendered HxWx3 frame (the same array at the default look)."""
        if self.gain == 1.0 and self.noise_std == 0.0:
            return img
        out = img.astype(np.float32) * self.gain
        if self.noise_std:
            out += np.random.default_rng([self.noise_seed, frame]).normal(0.0, self.noise_std, img.shape)
        return np.clip(out, 0, 255).astype(np.uint8)


DEFAULT_APPEARANCE = Appearance()


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

    def render(self, lanes_ego: list[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]],
               look: Appearance = DEFAULT_APPEARANCE) -> np.ndarray:
        """lanes_ego: per lane (centre, left_edge, right_edge) (N,2) polylines in the ego frame + line types."""
        img = Image.new("RGB", (self.w, self.h), look.ground)
        draw = ImageDraw.Draw(img)
        for _, left, right, _ in lanes_ego:
            poly = np.concatenate([left, right[::-1]])
            draw.polygon([tuple(p) for p in self.to_px(poly)], fill=look.asphalt)
        lw = max(1, int(round(look.marking_width_m / self.res)))
        for _centre, left, right, types in lanes_ego:
            for edge, kind in ((left, types[0]), (right, types[1])):
                if kind == 0:
                    continue
                px = self.to_px(edge)
                if kind == 1:  # striped: 3 m paint, 6 m gap (edge points are ~1 m apart)
                    for i in range(0, len(px) - 3, 9):
                        draw.line([tuple(p) for p in px[i:i + 4]], fill=look.marking, width=lw)
                else:
                    draw.line([tuple(p) for p in px], fill=look.marking, width=lw)
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
        """For pixels that see the ground: flat texture index and forward distance."""
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
        return hit.ravel(), inside, flat, depth.ravel()

    def render(self, lanes_ego, boxes_ego, light=None, look: Appearance = DEFAULT_APPEARANCE,
               frame: int = 0) -> dict[str, np.ndarray]:
        """boxes_ego: (x, y, heading, length, width, height, rgb) in the ego frame.
        light: (x, y, state) in the ego frame, or None. ``frame`` numbers the frame for the look's sensor noise."""
        tex = self.bev.render(lanes_ego, look).reshape(-1, 3)
        sky, ground_rgb = np.array(look.sky, np.float32), np.array(look.ground, np.float32)
        out = {}
        for k, cam in enumerate(self.cameras):
            hit, inside, flat, depth = self._ground[cam.name]
            fog = np.clip((depth - look.fog_start_m) / look.fog_range_m, 0.0, 1.0)
            img = np.empty((cam.height * cam.width, 3), np.float32)
            img[:] = sky
            ground = np.where(inside[:, None], tex[flat], ground_rgb).astype(np.float32)
            ground = ground * (1 - fog[:, None]) + sky * fog[:, None] * 0.8 + ground_rgb * fog[:, None] * 0.2
            img[hit] = ground[hit]
            pil = Image.fromarray(img.reshape(cam.height, cam.width, 3).astype(np.uint8))
            self._draw_boxes(pil, cam, boxes_ego, light)
            out[cam.name] = look.expose(np.asarray(pil), frame * len(self.cameras) + k)
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
