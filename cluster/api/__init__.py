"""The wire formats at the edge: the gRPC proto (`moeserve.proto`, stubs generated from it by `stubs`) and the
OpenAI-compatible HTTP schemas (`openai`)."""
