"""Pictures of what a model and its data look like, written as PNG files a person can open.

- ``attention``: every layer's and head's attention weights over a text, as heatmaps;
- ``embeddings``: token embeddings projected to 2-D (PCA and t-SNE), nearest neighbours;
- ``tokens``: a text coloured by token boundaries (terminal, HTML and PNG);
- ``curves``: loss and learning rate of one or several training runs;
- ``positions``: sinusoidal, learned and rotary position encodings side by side.

``cli.add_viz`` declares the ``gptlab viz`` command; each module's ``run_*`` does the work.
"""
