# Installed as mmoe.bench. From a checkout `import bench` works too, as the same package
# (mmoe/_checkout.py).
if __name__ == "bench":
    from mmoe._checkout import alias

    alias(__name__)
