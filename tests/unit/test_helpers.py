"""The test helpers themselves: compile_count must see compilations (were JAX to rename its monitoring event, every
"compiles nothing new" assertion in the suite would pass vacuously)."""
import jax
import jax.numpy as jnp

from helpers import compile_count


def test_compile_count_counts_each_compilation_of_a_function():
    @jax.jit
    def doubled_for_the_counter_test(x):
        return 2 * x

    assert compile_count(doubled_for_the_counter_test) == 0
    doubled_for_the_counter_test(jnp.ones(3))
    doubled_for_the_counter_test(jnp.zeros(3))  # same shape: no new compilation
    assert compile_count(doubled_for_the_counter_test) == 1
    doubled_for_the_counter_test(jnp.ones(4))
    assert compile_count(doubled_for_the_counter_test) == 2
