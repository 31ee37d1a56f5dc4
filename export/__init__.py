# Installed as mmoe.export. From a checkout `import export` works too, as the same package
# (mmoe/_checkout.py).
if __name__ == "export":
    from mmoe._checkout import alias

    alias(__name__)
