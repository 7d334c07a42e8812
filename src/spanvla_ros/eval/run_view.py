"""A rendered view of a run for people: a PNG strip of keyframes, each row the 3 cameras, a bird's-eye view
with the route, the other agents, the ego and the planned path, and the reasoning the plan was built on.

Reads any bag this project writes (drive recordings, replay outputs next to their input bag, generated
episodes) through `rosbags`; ROS-free. `spanvla-run-view BAG [BAG ...] --out view.png`.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.bag_io import BagError, decode_jpeg, typestore
from ..geometry import to_world, yaw_from_quat


@dataclass
class RunLog:
    images: dict = field(default_factory=dict)     # camera -> [(t, rgb or jpeg bytes)]
    odom: list = field(default_factory=list)       # (t, x, y, yaw)
    plans: list = field(default_factory=list)      # (t, (H, 2) ego-frame xy)
    status: dict = field(default_factory=dict)     # plan stamp -> (degraded, reason, limited by)
    reasoning: list = field(default_factory=list)  # (t, text)
    agents: list = field(default_factory=list)     # (t, [(x, y, yaw, length, width)])
    route: np.ndarray | None = None
    errors: list = field(default_factory=list)


def _t(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


FRAME_MAX_AGE_S = 1.0   # a keyframe shows each camera's newest frame at most this old


def keyframe_times(plan_times: list[float], rows: int) -> list[float]:
    """The plan stamps a strip of ``rows`` keyframes shows: evenly spread over the plans."""
    if not plan_times:
        return []
    idx = np.unique(np.linspace(0, len(plan_times) - 1, min(rows, len(plan_times))).round().astype(int))
    return [sorted(plan_times)[i] for i in idx]


def _plan_times(bag) -> list[float]:
    from rosbags.highlevel import AnyReader

    out = []
    try:
        with AnyReader([Path(bag)], default_typestore=typestore(with_spanvla_msgs=True)) as reader:
            conns = [c for c in reader.connections if c.msgtype == "nav_msgs/msg/Path"]
            for conn, _, raw in reader.messages(connections=conns):
                m: Any = reader.deserialize(raw, conn.msgtype)
                if m.header.frame_id == "base_link":
                    out.append(_t(m.header.stamp))
    except Exception:
        pass
    return out


def read_run(bags, cameras=("front_left", "front", "front_right"), keyframes_from=None, rows: int = 6,
             camera_topics: dict[str, str] | None = None) -> RunLog:
    """Collect what the view needs from one or more bags; a bag that breaks mid-way contributes what it read.
    With ``keyframes_from`` (the bag holding the plans) only the camera frames the strip's keyframes show are
    kept, so memory does not grow with the bags' length. ``camera_topics``: bag topic -> camera name, for a bag
    with its own names (replay's --remap); without it cameras are found by carla-ros-bridge naming (rgb_<camera>/)."""
    from rosbags.highlevel import AnyReader

    from ..ros.images import decode_rgb

    log = RunLog(images={c: [] for c in cameras})
    keys = keyframe_times(_plan_times(keyframes_from), rows) if keyframes_from is not None else None
    kept: dict[tuple[str, float], tuple[float, Any]] = {}

    def wanted(t: float) -> list[float]:
        return [k for k in keys or () if k - FRAME_MAX_AGE_S <= t <= k + 1e-6]

    for bag in bags:
        try:
            with AnyReader([Path(bag)], default_typestore=typestore(with_spanvla_msgs=True)) as reader:
                for conn, _, raw in reader.messages():
                    typ, topic = conn.msgtype, conn.topic
                    cam = (camera_topics.get(topic) if camera_topics is not None
                           else next((c for c in cameras if f"rgb_{c}/" in topic), None))
                    if cam and typ.startswith("sensor_msgs/msg/") and "Image" in typ:
                        m: Any = reader.deserialize(raw, typ)
                        t_img = _t(m.header.stamp)
                        # the keyframes this frame is newer for than what they hold
                        newer = [k for k in wanted(t_img) if kept.get((cam, k), (-math.inf,))[0] < t_img]
                        if keys is not None and not newer:
                            continue
                        data = bytes(m.data) if typ.endswith("CompressedImage") else \
                            decode_rgb(m.encoding, m.height, m.width, m.step, m.data)
                        if keys is None:
                            log.images[cam].append((t_img, data))
                        for k in newer:
                            kept[(cam, k)] = (t_img, data)
                    elif typ == "nav_msgs/msg/Odometry":
                        m = reader.deserialize(raw, typ)
                        p = m.pose.pose
                        log.odom.append((_t(m.header.stamp), p.position.x, p.position.y,
                                         yaw_from_quat(p.orientation)))
                    elif typ == "nav_msgs/msg/Path":
                        m = reader.deserialize(raw, typ)
                        xy = np.array([(q.pose.position.x, q.pose.position.y) for q in m.poses]).reshape(-1, 2)
                        if m.header.frame_id == "base_link":
                            log.plans.append((_t(m.header.stamp), xy))
                        elif "route" in topic:
                            log.route = xy
                    elif typ == "spanvla_ros/msg/PlanStatus":
                        m = reader.deserialize(raw, typ)
                        log.status[round(_t(m.header.stamp), 3)] = (bool(m.degraded), m.degraded_reason,
                                                                    getattr(m, "limited_by", ""))
                    elif typ == "spanvla_ros/msg/Reasoning":
                        m = reader.deserialize(raw, typ)
                        log.reasoning.append((_t(m.header.stamp), m.text))
                    elif typ == "visualization_msgs/msg/MarkerArray" and "agents" in topic:
                        m = reader.deserialize(raw, typ)
                        t = _t(m.markers[0].header.stamp) if m.markers else 0.0
                        log.agents.append((t, [(k.pose.position.x, k.pose.position.y, yaw_from_quat(k.pose.orientation),
                                                k.scale.x, k.scale.y) for k in m.markers]))
        except Exception as exc:  # corrupt / truncated: keep what was read, say so on the figure
            log.errors.append(f"{Path(bag).name}: {type(exc).__name__}")
    for (cam, _), frame in kept.items():
        log.images[cam].append(frame)
    for v in (log.odom, log.plans, log.reasoning, log.agents, *log.images.values()):
        v.sort(key=lambda r: r[0])
    return log


def _latest(rows, t, max_age=math.inf):
    best = None
    for r in rows:
        if r[0] > t + 1e-6:
            break
        best = r
    return best if best is not None and t - best[0] <= max_age else None


def _box(ax, x, y, yaw, length, width, **kw):
    c, s = math.cos(yaw), math.sin(yaw)
    pts = np.array([[length / 2, width / 2], [length / 2, -width / 2], [-length / 2, -width / 2],
                     [-length / 2, width / 2], [length / 2, width / 2]])
    ax.fill(x + pts[:, 0] * c - pts[:, 1] * s, y + pts[:, 0] * s + pts[:, 1] * c, **kw)


def render_strip(log: RunLog, out: Path, rows: int = 6, title: str = "") -> Path:
    """Keyframes evenly spread over the plans; returns the written PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log.plans:
        raise BagError("no plans (nav_msgs/Path in base_link) in the given bag(s): nothing to render")
    cams = list(log.images)
    times = [t for t, _ in log.plans]
    shown = [log.plans[times.index(k)] for k in keyframe_times(times, rows)]
    fig, axes = plt.subplots(len(shown), len(cams) + 2, figsize=(3.3 * (len(cams) + 2), 2.4 * len(shown)),
                             gridspec_kw=dict(width_ratios=[1.75] * len(cams) + [1.6, 2.0]), squeeze=False)
    for row, (t, plan) in zip(axes, shown):
        for ax, cam in zip(row, cams):
            ax.set_axis_off()
            fr = _latest(log.images[cam], t, max_age=FRAME_MAX_AGE_S)
            if fr is None:
                ax.text(0.5, 0.5, f"{cam}: no frame", ha="center", va="center", transform=ax.transAxes)
                continue
            ax.imshow(fr[1] if isinstance(fr[1], np.ndarray) else decode_jpeg(fr[1]))
            ax.set_title(f"{cam}  t-{t - fr[0]:.2f}s", fontsize=7)
        bev = row[len(cams)]
        pose = _latest(log.odom, t)
        degraded, reason, limited_by = log.status.get(round(t, 3), (False, "", ""))
        colour = "orange" if degraded else "limegreen"
        if pose is not None:
            x0, y0, yaw = pose[1:4]
            # ego-centred, heading up: rotate world by (pi/2 - yaw) about the ego
            c, s = math.cos(math.pi / 2 - yaw), math.sin(math.pi / 2 - yaw)
            def view(xy, x0=x0, y0=y0, c=c, s=s):
                d = np.asarray(xy, float)[:, :2] - (x0, y0)
                return np.stack([d[:, 0] * c - d[:, 1] * s, d[:, 0] * s + d[:, 1] * c], 1)
            if log.route is not None and len(log.route):
                r = view(log.route)
                bev.plot(r[:, 0], r[:, 1], color="0.75", lw=6, solid_capstyle="round", zorder=1)
            ag = _latest(log.agents, t, max_age=0.5)
            for ax_, ay, ayaw, al, aw in (ag[1] if ag else []):
                p = view([(ax_, ay)])[0]
                _box(bev, p[0], p[1], ayaw + math.pi / 2 - yaw, al, aw, color="tab:blue", zorder=2)
            world = to_world((x0, y0, yaw, 0.0), np.c_[plan, np.zeros((len(plan), 2))])
            p = view(world)
            bev.plot(np.r_[0, p[:, 0]], np.r_[0, p[:, 1]], "-o", color=colour, ms=3, lw=2, zorder=4)
        else:
            bev.plot(-plan[:, 1], plan[:, 0], "-o", color=colour, ms=3, lw=2)
        _box(bev, 0, 0, math.pi / 2, 4.6, 1.9, color="crimson", zorder=3)
        bev.set_xlim(-22, 22)
        bev.set_ylim(-12, 48)
        bev.set_aspect("equal")
        bev.set_xticks([])
        bev.set_yticks([])
        bev.set_title("BEV: plan " + ("(degraded)" if degraded else "") + (" (slowed)" if limited_by else ""),
                      fontsize=7)
        txt = row[len(cams) + 1]
        txt.set_axis_off()
        rs = _latest(log.reasoning, t)
        body = (rs[1] or "(empty reasoning)") if rs else "(no reasoning yet)"
        import textwrap
        txt.text(0.0, 1.0, f"t = {t - log.plans[0][0]:.1f} s\n" + textwrap.fill(body, 42)
                 + (f"\n\n[{textwrap.fill(reason, 42)}]" if degraded else "")
                 + (f"\n\n[slowed: {textwrap.fill(limited_by, 42)}]" if limited_by else ""),
                 va="top", ha="left", fontsize=7, family="monospace", transform=txt.transAxes)
    fig.suptitle(title + ("   (bag read partially: " + "; ".join(log.errors) + ")" if log.errors else ""), fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bags", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: run_view.png next to the first bag")
    ap.add_argument("--rows", type=int, default=6)
    a = ap.parse_args(argv)
    out = a.out or a.bags[0].parent / "run_view.png"
    try:
        render_strip(read_run(a.bags), out, a.rows, title=", ".join(b.name for b in a.bags))
    except BagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
