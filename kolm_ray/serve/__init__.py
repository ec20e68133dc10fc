"""The recall router's logic (tenants, routing, `kolm serve`) and `kolm bench`."""
