"""Generated gRPC stubs of proto/*.proto: dataplane.proto (moeray.dataplane.v1, the router <-> actor data
plane, used by cluster/dataplane/transport.py) and moeray.proto (moeray.v1, the public API, cluster/api/grpc_api.py).
Never edit them by hand: change the proto, then run `python -m cluster.rpc.generate`."""
