"""The chapters' entry points: each module measures one chapter's figures in one run, prints
them and checks them against the chapter's targets (`python -m labkit.targets.<chapter>`).

They stand above every technique and composer, and nothing in labkit imports them.
"""
