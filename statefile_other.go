//go:build unix && !linux

package graceful

import "os"

// stateFile makes the file the state travels in: a temporary file, removed
// at once (its descriptor keeps it).
func stateFile() (*os.File, error) { return memFile("graceful-state") }

// memFile makes a temporary file, removed at once.
func memFile(name string) (*os.File, error) {
	f, err := os.CreateTemp("", name+"-")
	if err != nil {
		return nil, err
	}
	os.Remove(f.Name())
	return f, nil
}

// sealState does nothing: only a memfd can be sealed.
func sealState(*os.File) error { return nil }

// checkSealed accepts the file: a temporary file cannot be sealed (the
// parent, of the same user, could change it under us either way).
func checkSealed(*os.File) error { return nil }
