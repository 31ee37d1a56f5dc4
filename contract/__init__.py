# Installed as mmoe.contract. From a checkout `import contract` works too, as the same package
# (mmoe/_checkout.py).
if __name__ == "contract":
    from mmoe._checkout import alias

    alias(__name__)
