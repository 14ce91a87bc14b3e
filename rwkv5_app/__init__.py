"""The operator's tools on top of the libraries and flows: the `rwkv5` command and the local stack it starts."""
