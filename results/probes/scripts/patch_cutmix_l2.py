exec(open("runs/probe/patch_cutmix.py").read())
exec(open("runs/probe/patch_l2.py").read())
