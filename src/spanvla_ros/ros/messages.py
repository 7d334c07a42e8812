"""Message builders shared by the nodes, tools and test publishers."""
from __future__ import annotations


def xy_path_msg(xy, frame_id: str, stamp=None):
    """nav_msgs/Path through the (N, 2) points ``xy`` (orientation left at identity), e.g. a route."""
    from geometry_msgs.msg import PoseStamped
    from nav_msgs.msg import Path

    path = Path()
    path.header.frame_id = frame_id
    if stamp is not None:
        path.header.stamp = stamp
    for x, y in xy:
        ps = PoseStamped()
        ps.header = path.header
        ps.pose.position.x, ps.pose.position.y, ps.pose.orientation.w = float(x), float(y), 1.0
        path.poses.append(ps)
    return path

