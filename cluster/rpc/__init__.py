"""Generated gRPC stubs of proto/dataplane.proto (moeray.dataplane.v1). Never edit them by hand:
change the proto, then run `python -m cluster.rpc.generate`. Only cluster/transport.py uses them."""
