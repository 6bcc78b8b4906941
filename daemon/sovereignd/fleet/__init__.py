"""More than one host: configuration for the load balancer and monitoring in front of them."""
