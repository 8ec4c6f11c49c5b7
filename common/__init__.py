"""Code shared by every role: data, DBN math, parameter layout, RMA protocol."""
