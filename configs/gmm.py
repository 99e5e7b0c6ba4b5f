"""Low-dimensional data: an MLP denoiser on a 2-D Gaussian mixture stored as an array.

Make the data (any [N, D] float array works; labels optional under key 'label'):

    python -c "import jax, numpy as np; from diffusion_jax import oracles; \\
      x, y = oracles.example_mixture().sample(jax.random.PRNGKey(0), 20000); \\
      np.savez('/tmp/gmm.npz', x=np.asarray(x), label=np.asarray(y))"
    python -m diffusion_jax.main --config=configs/gmm.py --workdir=runs/gmm --config.data.path=/tmp/gmm.npz
"""

from diffusion_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'array'
  config.data.path = '/tmp/gmm.npz'
  config.model.name = 'mlp'
  config.model.mlp.hidden_dim = 256
  config.model.mlp.num_layers = 4
  config.training.batch_size = 512
  config.training.num_train_steps = 5000
  config.training.sample_every = 0
  config.training.num_sample_images = 0
  config.optim.learning_rate = 1e-3
  config.sampling.method = 'dpmpp_2m'
  config.sampling.num_steps = 30
  return config
