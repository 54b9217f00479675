"""The decoder service: gRPC Generate over the clasp engine, plans from the planner via Redis."""
