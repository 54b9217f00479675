"""The planner service: runs the layer-skip DP for decoder sessions, fed through Redis."""
