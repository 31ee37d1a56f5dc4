# Installed as mmoe.model. From a checkout `import model` works too, as the same package
# (mmoe/_checkout.py).
if __name__ == "model":
    from mmoe._checkout import alias

    alias(__name__)
