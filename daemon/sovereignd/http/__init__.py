"""HTTP/1.1 to the model server: the gateway's upstream client."""
