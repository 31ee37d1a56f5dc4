# Installed as mmoe.service. From a checkout `import service` works too, as the same package
# (mmoe/_checkout.py).
if __name__ == "service":
    from mmoe._checkout import alias

    alias(__name__)
