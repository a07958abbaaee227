//! A test with one `intervene!` block: run it with `cargo test`.

use nnsight::prelude::*;

#[test]
fn paris_comes_next_and_layer_5_has_the_hidden_size() -> nnsight::Result<()> {
    nnsight::tch::set_num_threads(1);
    let model = LanguageModel::<Llama>::load_with(nnsight::default_model()?, LoadOptions::default().progress(false))?;
    intervene!(model.trace("The Eiffel Tower is in the city of") {
        let h5 = model.model.layers[5].output.save();
        let top = model.output.i((0, -1)).argmax(-1, false).save();
    });
    assert_eq!(h5.size(), vec![1, 9, 576]);
    assert_eq!(model.decode(&[top.int64_value(&[])])?, " Paris");
    Ok(())
}
