"""A short, varied English text that int8 quantisation runs through a model once to see how large
each input channel of each layer gets (``gptlab.inference.quantize.calibrate``): narrative,
dialogue, instructions, numbers and a little code, so that the channels of each kind of text
are seen. Written for gptlab; any similar text would do."""

CALIBRATION_TEXT = """\
The river was low that autumn, and the ferry ran only in the mornings. Anna walked down to the
landing before sunrise with a basket of apples and a letter she had written three times.

"Are you going across?" asked the ferryman, a tall man with a grey beard.
"Yes. My brother lives in the town on the other side. I have not seen him in two years."
"Then you had better sit near the front. The wind is cold today."

How to make a simple loaf of bread: mix 500 g of flour, 10 g of salt and 7 g of dried yeast.
Add 320 ml of warm water and knead the dough for ten minutes, until it is smooth. Leave it to
rise for about an hour, shape it, let it rise again, and bake it at 220 C for 30 to 35 minutes.

User: Can you explain what a neural network is, in one or two sentences?
Assistant: A neural network is a function built from many simple units, each of which adds up
its weighted inputs and passes the result through a non-linearity. Training adjusts the weights
so that the outputs match the examples it is shown.
User: thanks! what's the difference between a list and a tuple in Python?
Assistant: A list can be changed after it is made; a tuple cannot. For example:

    numbers = [3, 1, 4]
    numbers.append(1)      # fine
    point = (2.5, -1.0)    # point[0] = 0 raises a TypeError

In 1969, 1,000 people watched the launch from the beach; by 2024 the town had 48,350 residents,
a 12.5% increase on the census of 2014. Prices rose from $3.20 to $4.75 (about +48%).

Q: What is the capital of France?
A: Paris.
Q: Why is the sky blue?
A: Sunlight is scattered by the air, and blue light, with its shorter wavelength, is scattered
the most, so it reaches our eyes from every part of the sky.
"""
