"""Device mesh, logical-axis sharding rules, multi-host initialisation."""
