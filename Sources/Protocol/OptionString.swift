/// QEMU-style option values: `key=value,key=value`, where `,,` stands for a literal comma
/// (QEMU's QemuOpts syntax, which StratoVirt's command line follows).
struct OptionString {
    /// Keys and values in order of appearance.
    private(set) var pairs: [(key: String, value: String)] = []
    let option: String

    /// Splits `text` into pairs. A first element without `=` is given to `impliedKey`
    /// (`-smp 4` means `cpus=4`); anywhere else it is an error.
    init(_ text: String, option: String, impliedKey: String? = nil, allowedKeys: [String]) throws(ConfigError) {
        self.option = option
        let elements = Self.split(text)
        let allowedText = allowedKeys.joined(separator: ", ")
        for (index, element) in elements.enumerated() {
            let key: String
            let value: String
            if let equals = element.firstIndex(of: "=") {
                key = String(element[..<equals])
                value = String(element[element.index(after: equals)...])
            } else if index == 0, let impliedKey {
                key = impliedKey
                value = element
            } else {
                throw ConfigError(
                    field: option, value: element, problem: "expected key=value",
                    allowed: allowedText)
            }
            guard allowedKeys.contains(key) else {
                throw ConfigError(field: option, value: key, problem: "unknown key", allowed: allowedText)
            }
            guard !pairs.contains(where: { $0.key == key }) else {
                throw ConfigError(field: "\(option) \(key)", problem: "given more than once")
            }
            pairs.append((key, value))
        }
    }

    /// The comma-separated elements of `text`, `,,` standing for a literal comma.
    static func split(_ text: String) -> [String] {
        var elements: [String] = []
        var current = ""
        var characters = Array(text)[...]
        while let character = characters.popFirst() {
            if character == "," {
                if characters.first == "," {
                    characters.removeFirst()
                    current.append(",")
                } else {
                    elements.append(current)
                    current = ""
                }
            } else {
                current.append(character)
            }
        }
        elements.append(current)
        return elements
    }

    subscript(key: String) -> String? {
        pairs.first { $0.key == key }?.value
    }

    func field(_ key: String) -> String { "\(option) \(key)" }

    func required(_ key: String) throws(ConfigError) -> String {
        guard let value = self[key] else {
            throw ConfigError(field: field(key), problem: "is required")
        }
        guard !value.isEmpty else {
            throw ConfigError(field: field(key), value: value, problem: "must not be empty")
        }
        return value
    }

    func optionalString(_ key: String) throws(ConfigError) -> String? {
        guard let value = self[key] else { return nil }
        guard !value.isEmpty else {
            throw ConfigError(field: field(key), value: value, problem: "must not be empty")
        }
        return value
    }

    func bool(_ key: String) throws(ConfigError) -> Bool? {
        guard let value = self[key] else { return nil }
        return try ConfigRules.parseBool(value, field: field(key))
    }

    func unsigned(_ key: String) throws(ConfigError) -> UInt64? {
        guard let value = self[key] else { return nil }
        return try ConfigRules.parseUnsigned(value, field: field(key))
    }
}
