//go:build unix && !linux

package graceful

import "os"

// stateFile makes the file the state travels in: a temporary file, removed
// at once (its descriptor keeps it).
func stateFile() (*os.File, error) {
	f, err := os.CreateTemp("", "graceful-state-")
	if err != nil {
		return nil, err
	}
	os.Remove(f.Name())
	return f, nil
}
